"""Scaling-law analysis: iso-FLOP parabolas, power laws, compute multiplier, the report."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lldiff.sweep import analysis, bootstrap, fits
from lldiff.sweep.analysis import aggregate_seeds, analyze_results
from lldiff.sweep.fits import (compute_multiplier, fit_isoflop_parabola, fit_power_law, fit_saturating_power_law,
                               match_compute, nonparametric_multipliers)
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
                      objectives=("ar", "mdm"), surfaces=None) -> pd.DataFrame:
    """results.csv rows: per budget, sizes log-spaced around the surface's optimum."""
    surfaces = SURFACE if surfaces is None else surfaces
    rng = np.random.default_rng(seed)
    rows = []
    for obj in objectives:
        for c in budgets:
            n_star = optimal_n(c, surfaces[obj])
            for i, r in enumerate(np.linspace(-half_width, half_width, sizes_per_budget)):
                n = round(n_star * math.exp(r))
                for s in seeds:
                    loss = surface_loss(n, c, surfaces[obj]) + rng.normal(0, noise)
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
    assert result.multipliers == [] and "needs both the reference 'ar'" in result.notes[0]


def test_saturating_law_needs_four_budgets():
    with pytest.raises(ValueError, match=">= 4 distinct budgets, got 3"):
        fit_saturating_power_law([1e17, 1e18, 1e19], [3.0, 2.8, 2.6])


def test_two_budgets_do_not_crash():
    result = analyze_results(synthetic_results([1e18, 1e19], noise=0.002))
    for obj, fit in result.fits.items():
        assert fit.loss_law is not None and math.isnan(fit.loss_law.exponent_se)
        assert fit.loss_law_saturating is None
        assert any("needs >= 4 budgets" in n for n in fit.notes)
        # the t interval is undefined with 2 budgets; the bootstrap one is not
        lo, hi = result.bootstrap.objectives[obj].b_ci95
        assert math.isfinite(lo) and math.isfinite(hi) and lo < -fit.loss_law.exponent < hi
    assert len(result.multipliers) == 2 and all(np.isfinite(r.parametric) for r in result.multipliers)
    assert all(np.isfinite(r.parametric_ci95).all() for r in result.multipliers)


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
    saturating = fits.SaturatingPowerLaw(3.0, 50.0, 0.1, 0, 0, 0, 4)  # floor above AR's loss: never reached
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


# --------------------------------------------------------------------------- bracketing


BRACKET_SIZES = np.array([1e6, 1e7, 1e8])


def parabola_at(x_vertex: float, curvature: float = 0.05) -> np.ndarray:
    return curvature * (np.log(BRACKET_SIZES) - x_vertex) ** 2 + 3.0


@pytest.mark.parametrize("case, losses, bracketed", [
    ("vertex inside", parabola_at(math.log(3e6)), True),
    ("vertex on the upper edge", parabola_at(math.log(1e8)), False),
    ("vertex on the lower edge", parabola_at(math.log(1e6)), False),
    ("vertex outside", parabola_at(math.log(1e10)), False),
    ("opens downward", parabola_at(math.log(1e7), curvature=-0.05), False),
    ("flat", np.full(3, 3.0), False),
])
def test_bracketed_is_exact(case, losses, bracketed):
    p = fit_isoflop_parabola(BRACKET_SIZES, losses, budget=1e18)
    assert p.bracketed is bracketed, case
    if bracketed:
        assert p.n_opt == pytest.approx(3e6, rel=1e-9) and p.warning is None
    else:
        assert p.warning is not None or not p.usable


def test_unbracketed_budgets_fall_back_and_are_reported(tmp_path):
    df = synthetic_results([1e18, 1e19, 1e20], noise=0.0)
    shifted = (df["objective"] == "mdm") & (df["budget"] == 1e19)
    x = np.log(df.loc[shifted, "n_nonemb"].to_numpy(float))
    df.loc[shifted, "val_nll_per_token"] = 3.5 + 0.02 * (x - x.min() + 2.5) ** 2  # vertex below the smallest size
    result = analyze_results(df)
    fit = result.fits["mdm"]
    assert not fit.bracketed(1e19) and fit.bracketed(1e18) and fit.unbracketed == [1e19]
    assert fit.sources() == ["parabola", "frontier", "parabola"]
    assert not result.all_bracketed and result.unbracketed == {"mdm": [1e19]}
    assert analyze_results(synthetic_results([1e18, 1e19, 1e20])).all_bracketed
    write_results(tmp_path, df)
    text = analyze(tmp_path).read_text()
    headline = text[text.index("## Headline"):text.index("## Compute multiplier")]
    assert "All budgets of all objectives bracketed: **no** (not bracketed: MDM: C=1e+19" in headline
    optima = text[text.index("## Iso-FLOP optima"):]
    assert optima.count("| bracketed vertex |") == 5 and optima.count("| fallback: best measured size |") == 1
    write_results(tmp_path, synthetic_results([1e18, 1e19, 1e20]))
    assert "All budgets of all objectives bracketed: **yes**" in analyze(tmp_path).read_text()


# --------------------------------------------------------------------------- bootstrap


K_TRUE = 16.0


def scaled_surfaces(k: float) -> dict[str, tuple[float, ...]]:
    """Chinchilla surfaces without an irreducible term (so L_opt(C) is an exact power law)
    where the MDM is the AR model with k times less effective data, B_mdm = B k^beta: then
    L_opt,mdm(C) = L_opt,ar(C / k), the true multiplier is k at every C and both objectives
    have the same exponents a and b. The parabola's bias (the slice is not a parabola) is the
    same relative shift at every budget and for both objectives, so it cancels in k."""
    _, a, b, alpha, beta = SURFACE["ar"]
    return {"ar": (0.0, a, b, alpha, beta), "mdm": (0.0, a, b * k**beta, alpha, beta)}


def coverage(k: float, *, seeds, repetitions: int, replicates: int = 200) -> dict[str, float]:
    """Fraction of repetitions (fresh noise 0.01 each) whose bootstrap 95% interval contains the
    truth, per interval: k at each AR budget (power-law and non-parametric) and Δa = Δb = 0."""
    budgets = [1e18, 1e19, 1e20]
    base = synthetic_results(budgets, seeds=seeds, sizes_per_budget=5, noise=0.0, surfaces=scaled_surfaces(k))
    rng = np.random.default_rng(123)
    hits: dict[str, int] = {}
    for rep in range(repetitions):
        df = base.assign(val_nll_per_token=base["val_nll_per_token"] + rng.normal(0, 0.01, len(base)))
        result = analyze_results(df, bootstrap=replicates, bootstrap_seed=rep)
        rows = result.multipliers_for("mdm")
        assert [r.budget for r in rows] == budgets
        comparison = result.bootstrap.comparisons["mdm"]
        covered = {"delta_a": comparison.delta_a_ci95[0] <= 0 <= comparison.delta_a_ci95[1],
                   "delta_b": comparison.delta_b_ci95[0] <= 0 <= comparison.delta_b_ci95[1]}
        for r in rows:
            covered[f"k_power@{r.budget:.0e}"] = r.parametric_ci95[0] <= k <= r.parametric_ci95[1]
            covered[f"k_nonparametric@{r.budget:.0e}"] = r.nonparametric_ci95[0] <= k <= r.nonparametric_ci95[1]
        for key, hit in covered.items():
            hits[key] = hits.get(key, 0) + bool(hit)
    return {key: v / repetitions for key, v in hits.items()}


def test_bootstrap_covers_the_true_multiplier_with_one_seed():
    """One seed per cell: residual bootstrap. 200 repetitions of a 3-budget x 5-size sweep."""
    for key, rate in coverage(K_TRUE, seeds=(0,), repetitions=200).items():
        assert rate >= 0.85, (key, rate)


def test_bootstrap_over_seeds_covers_identical_surfaces():
    """Identical surfaces (k = 1, equal exponents), 3 seeds per cell: seeds resampled."""
    for key, rate in coverage(1.0, seeds=(0, 1, 2), repetitions=200).items():
        assert rate >= 0.85, (key, rate)


def test_bootstrap_is_fast_reproducible_and_names_its_resampling():
    import time

    df = synthetic_results([1e18, 1e19, 1e20], sizes_per_budget=5, noise=0.01)
    result = analyze_results(df, bootstrap=0)
    assert result.bootstrap is None and all(math.isnan(r.parametric_ci95[0]) for r in result.multipliers)
    samples = analysis.cell_samples(df)
    start = time.perf_counter()
    boot = bootstrap.bootstrap_sweep(result.fits, result.points, samples, replicates=1000, seed=7)
    assert time.perf_counter() - start < 1.0
    again = bootstrap.bootstrap_sweep(result.fits, result.points, samples, replicates=1000, seed=7)
    assert np.array_equal(boot.comparisons["mdm"].parametric, again.comparisons["mdm"].parametric)
    assert boot.methods("ar") == {"pooled-residual": 3} and boot.objectives["mdm"].bracket_held() > 0.99
    own = bootstrap.bootstrap_sweep(result.fits, result.points, samples, replicates=50, pool_residuals=False)
    assert own.methods("mdm") == {"residual": 3}
    seeded = synthetic_results([1e18, 1e19, 1e20], sizes_per_budget=5, seeds=(0, 1))
    assert analyze_results(seeded).bootstrap.methods("ar") == {"seeds": 3}
    mixed = seeded[~((seeded["seed"] == 1) & (seeded["budget"] == 1e19))]  # one budget with single seeds
    assert analyze_results(mixed).bootstrap.methods("ar") == {"seeds": 2, "pooled": 1}


def test_replicates_that_lose_the_bracket_fall_back_like_the_estimator(tmp_path):
    """A barely convex, noisy slice: some replicates' parabolas open downward or move their
    vertex out of the sampled sizes. Each replicate applies the point estimator itself, so
    those take their best measured size: nothing is dropped, N_opt stays within the measured
    sizes, and the report says how often each budget's bracket held."""
    df = synthetic_results([1e18, 1e19, 1e20], sizes_per_budget=5, noise=0.01, objectives=("ar",))
    rng = np.random.default_rng(0)
    flat = df["budget"] == 1e19
    x = np.log(df.loc[flat, "n_nonemb"].to_numpy(float))
    df.loc[flat, "val_nll_per_token"] = 3.0 + 0.006 * (x - x.mean()) ** 2 + rng.normal(0, 0.01, x.size)
    result = analyze_results(df, bootstrap=1000)
    assert result.fits["ar"].bracketed(1e19)
    boot = result.bootstrap.objectives["ar"]
    held = boot.bracket_held(1e19)
    assert 0.3 < held < 0.95 and boot.bracket_held(1e18) > held and boot.bracket_held(1e20) > held
    assert boot.ok.all() and np.isfinite(boot.n_exponent).all()
    column = boot.fallback[:, 1]
    sizes = set(df.loc[flat, "n_nonemb"].astype(float))
    assert set(boot.n_opt[column, 1]) <= sizes  # a fallback replicate takes one of the measured sizes
    n = sorted(sizes)
    assert ((n[0] < boot.n_opt[~column, 1]) & (boot.n_opt[~column, 1] < n[-1])).all()
    lo, hi = boot.n_opt_ci95(1e19)
    assert n[0] <= lo < result.fits["ar"].parabolas[1e19].n_opt < hi <= n[-1]
    write_results(tmp_path, df)
    text = analyze(tmp_path).read_text()
    assert f"Replicates in which every budget stayed bracketed: AR {100 * boot.bracket_held():.1f}%" in text
    assert f"C=1e+19: {100 * held:.0f}%" in text


def test_percentile_interval_handles_infinities():
    assert bootstrap.percentile_interval(np.arange(101.0)) == pytest.approx((2.5, 97.5))
    values = np.r_[np.arange(90.0), np.full(10, np.inf)]  # 10% never reach the loss
    lo, hi = bootstrap.percentile_interval(values)
    assert math.isfinite(lo) and hi == math.inf
    assert all(math.isnan(v) for v in bootstrap.percentile_interval([math.nan]))


def test_batch_matching_equals_the_scalar_one():
    c = np.logspace(15, 20, 6)
    rng = np.random.default_rng(3)
    losses = 12 * c**-0.06 * np.exp(rng.normal(0, 0.01, (50, c.size)))
    targets = 10 * 1e18**-0.05 * np.exp(rng.normal(0, 0.2, 50))
    slopes = np.where(np.arange(50) % 7 == 0, np.nan, -0.06)
    batch = fits.match_compute_batch(targets, c, losses, slopes)
    for t, row, slope, got in zip(targets, losses, slopes, batch):
        want = match_compute(t, c, row, None if np.isnan(slope) else slope).c_prime
        assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want, rel=1e-9)


# --------------------------------------------------------------------------- several objectives


def test_three_objectives_analyse_draw_and_report(tmp_path):
    surfaces = {**SURFACE, "bd3-4": (1.75, 480.0, 500.0, 0.34, 0.28)}
    df = synthetic_results(np.logspace(17, 20, 4), objectives=("ar", "mdm", "bd3-4"), surfaces=surfaces)
    result = analyze_results(df)
    assert result.objectives == ["ar", "bd3-4", "mdm"] and result.candidates == ["bd3-4", "mdm"]
    for cand in ("bd3-4", "mdm"):
        rows = result.multipliers_for(cand)
        assert len(rows) == 4 and all(r.reference == "ar" and r.nonparametric > 1 for r in rows)
        assert all(r.parametric_ci95[0] <= r.parametric <= r.parametric_ci95[1] for r in rows)
    bd3, mdm = (np.array([r.nonparametric for r in result.multipliers_for(c)]) for c in ("bd3-4", "mdm"))
    assert (bd3 < mdm).all()  # bd3-4's surface lies between AR's and MDM's
    assert set(result.bootstrap.comparisons) == {"bd3-4", "mdm"}
    write_results(tmp_path, df)
    text = analyze(tmp_path).read_text()
    assert text.startswith("# Scaling sweep: BD3-4 vs AR, MDM vs AR\n")
    for needle in ("### BD3-4 vs AR", "### MDM vs AR", "| BD3-4 − AR |", "| MDM − AR |", "Reference objective: AR",
                   "BD3-4, MDM: Monte-Carlo negative ELBO", "- BD3-4 vs AR: at the measured budgets"):
        assert needle in text, needle
    assert (tmp_path / "analysis" / "scaling_laws.png").is_file()
    other = analyze_results(df, reference="mdm", bootstrap=50)  # any objective can be the reference
    assert other.candidates == ["ar", "bd3-4"] and all(r.nonparametric < 1 for r in other.multipliers_for("ar"))


def test_objective_styles_fall_back_deterministically():
    from lldiff.sweep.objective_facts import OBJECTIVE_STYLES, objective_name, objective_styles

    names = ["ar", "mdm", "bd3-4", "bd3-16", "bd3-64"]
    styles = objective_styles(names)
    assert styles["ar"] == OBJECTIVE_STYLES["ar"] and styles["mdm"] == OBJECTIVE_STYLES["mdm"]
    assert len({s.color for s in styles.values()}) == len(names)
    assert len({s.marker for s in styles.values()}) == len(names)
    assert objective_styles(list(reversed(names))) == styles  # independent of order
    assert styles["bd3-16"].label == objective_name("bd3-16") == "BD3-16" and objective_name("ar") == "AR"


# --------------------------------------------------------------------------- compute axis


def test_compute_axis_from_results():
    df = synthetic_results([1e18, 1e19, 1e20])
    assert analysis.compute_axis(df) == "6nd"  # old results.csv without the column
    assert analysis.compute_axis(df.assign(compute="matmul")) == "matmul"
    assert analysis.compute_axis(df.assign(compute=np.where(df.index % 2, "6nd", None))) == "6nd"
    with pytest.raises(ValueError, match="mix compute axes 6nd, matmul"):
        analysis.compute_axis(df.assign(compute=np.where(df.index % 2, "6nd", "matmul")))
    with pytest.raises(ValueError, match="unknown compute axis 'flops'"):
        analyze_results(df.assign(compute="flops"))
    assert analyze_results(df.assign(compute="matmul"), bootstrap=0).compute == "matmul"


def test_report_states_the_compute_axis(tmp_path):
    df = synthetic_results([1e18, 1e19, 1e20])
    write_results(tmp_path, df)
    text = analyze(tmp_path, bootstrap=50).read_text()
    assert "Compute axis: C = 6·N·D (SMDM)" in text and "D_opt = C / (6 N_opt)" in text
    matmul = df.assign(compute="matmul", flops_6nd=df["flops"], flops_matmul=1.3 * df["flops"])
    write_results(tmp_path, matmul)
    text = analyze(tmp_path, bootstrap=50).read_text()
    assert ("Compute axis: real matmul FLOPs (forward+backward, incl. LM head and attention)" in text
            and "D_opt is not shown" in text)
    assert "`compute`" not in text and "`flops_matmul`" not in text  # not listed as hyperparameters
    write_results(tmp_path, df.assign(compute=np.where(df.index % 2, "6nd", "matmul")))
    with pytest.raises(ValueError, match="mix compute axes"):
        analyze(tmp_path)


def test_matmul_training_curves_use_their_tag(tmp_path):
    SummaryWriter = pytest.importorskip("torch.utils.tensorboard").SummaryWriter
    df = synthetic_results([1e18, 1e19, 1e20], objectives=("ar",), sizes_per_budget=3)
    run = df.iloc[0]
    writer = SummaryWriter(str(tmp_path / "tb" / run["run_id"]))
    for step in (10, 20):
        writer.add_scalar("trainer/flops", 100.0 * step, step)
        writer.add_scalar("trainer/flops_matmul", 130.0 * step, step)
        writer.add_scalar("val/nll_per_token", 4.0 - step / 100, step)
    writer.add_scalar("trainer/tokens", 1000.0 * 30, 30)  # a step without either FLOPs tag
    writer.add_scalar("val/nll_per_token", 3.7, 30)
    writer.close()
    tb = tmp_path / "tb" / run["run_id"]
    assert read_training_curve(tb)["flops"].tolist()[:2] == pytest.approx([1000.0, 2000.0])
    matmul = read_training_curve(tb, compute="matmul", flops_per_token=2.0)
    assert matmul["flops"].tolist() == pytest.approx([1300.0, 2600.0, 2.0 * 1000 * 30])
    rows = df.assign(compute="matmul", flops_matmul=2.0 * df["tokens"])
    curves = load_training_curves(tmp_path, rows, compute="matmul")
    assert curves["flops"].tolist() == pytest.approx([1300.0, 2600.0, 60_000.0])
    write_results(tmp_path, rows)
    assert analyze(tmp_path, bootstrap=20).is_file()
