"""The data-constrained (repetition) fit of Muennighoff et al. (2023), best epoch, crossover."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lldiff.sweep.repetition import (best_epoch, crossover_compute, effective_data, fit_repetition_decay)

EPOCHS = 2.0 ** np.arange(8)  # 1, 2, 4, ..., 128
UNIQUE = 1e8
L_INF, B_REL, BETA = 2.0, 1.5, 0.3  # L = L_inf + B_rel (D'/U)^-beta


def losses(r_star: float, noise: float = 0.0, seed: int = 0, epochs=EPOCHS) -> np.ndarray:
    rng = np.random.default_rng(seed)
    clean = L_INF + B_REL * (effective_data(epochs, UNIQUE, r_star) / UNIQUE) ** -BETA
    return clean + rng.normal(0, noise, np.size(epochs))


def test_effective_data_limits():
    e = np.array([0.5, 1.0, 2.0, 11.0])
    assert effective_data(e, UNIQUE, math.inf) == pytest.approx(UNIQUE * e)
    assert effective_data(e, UNIQUE, 0.0) == pytest.approx(UNIQUE * np.array([0.5, 1, 1, 1]))
    # one R* of repetitions beyond the first epoch keeps 1 - 1/e of the repeated data's value
    assert effective_data(11.0, UNIQUE, 10.0) == pytest.approx(UNIQUE * (1 + 10 * (1 - math.exp(-1))))
    assert effective_data(1.001, UNIQUE, 1e6) == pytest.approx(UNIQUE * 1.001)  # early repeats ~ fresh data


@pytest.mark.parametrize("r_star", [5.0, 200.0])
def test_fit_recovers_r_star_within_its_interval(r_star):
    fit = fit_repetition_decay(EPOCHS, losses(r_star, noise=0.001, seed=1), UNIQUE)
    lo, hi = fit.r_star_ci95
    assert lo < r_star < hi
    assert fit.bounded == "interval" and not fit.only_lower_bound
    assert fit.r_star == pytest.approx(r_star, rel=0.3)
    assert fit.beta == pytest.approx(BETA, abs=0.05)
    assert fit(EPOCHS[: len(fit.epochs)]) == pytest.approx(losses(r_star)[: len(fit.epochs)], abs=0.005)
    exact = fit_repetition_decay(EPOCHS, losses(r_star), UNIQUE)
    assert exact.r_star == pytest.approx(r_star, rel=1e-3) and exact.l_inf == pytest.approx(L_INF, abs=1e-3)
    assert exact.b == pytest.approx(B_REL * UNIQUE**BETA, rel=1e-2)  # B is for D' in tokens


def test_repeats_as_good_as_fresh_data_give_only_a_lower_bound():
    fit = fit_repetition_decay(EPOCHS, losses(math.inf, noise=0.001, seed=2), UNIQUE)
    lo, hi = fit.r_star_ci95
    assert hi == math.inf and lo > 50 and fit.only_lower_bound and fit.bounded == "lower"
    assert "only a lower bound" in fit.note


def test_rising_tail_is_excluded():
    """Overfitting after 16 epochs: the fit uses epochs up to the best one only."""
    y = losses(5.0, noise=0.0005, seed=3)
    y[EPOCHS > 16] = y[EPOCHS == 16] + 0.02 * np.log2(EPOCHS[EPOCHS > 16] / 16)
    assert best_epoch(EPOCHS, y) == 16.0
    fit = fit_repetition_decay(EPOCHS, y, UNIQUE)
    assert fit.epochs == (1.0, 2.0, 4.0, 8.0, 16.0) and fit.excluded_epochs == (32.0, 64.0, 128.0)
    assert "up to and including the best one (E=16)" in fit.note and "overfitting" in fit.note
    assert fit.r_star_ci95[0] < 5.0 < fit.r_star_ci95[1]
    everything = fit_repetition_decay(EPOCHS, y, UNIQUE, through_best=False)
    assert len(everything.epochs) == 8 and everything.excluded_epochs == () and "all 8 epochs" in everything.note
    assert everything.rss > 10 * fit.rss  # the rising tail does not fit the form


def test_fixed_beta_and_too_few_epochs():
    y = losses(5.0)
    with pytest.raises(ValueError, match=r">= 5 distinct epochs up to the best one .* got 4 \(best epoch 8\)"):
        fit_repetition_decay(EPOCHS[:4], y[:4], UNIQUE)
    fixed = fit_repetition_decay(EPOCHS[:4], y[:4], UNIQUE, beta=BETA)
    assert fixed.beta == BETA and fixed.n_params == 3 and "beta fixed" in fixed.note
    assert fixed.r_star == pytest.approx(5.0, rel=1e-3)
    with pytest.raises(ValueError, match="positive"):
        fit_repetition_decay([0, 1, 2, 3, 4], [3, 2.9, 2.8, 2.7, 2.6], UNIQUE)


def test_best_epoch_takes_the_earliest_minimum():
    assert best_epoch([4, 1, 2, 8], [2.5, 3.0, 2.6, 2.5]) == 4.0


def test_crossover_on_lines_is_exact():
    """Losses linear in ln C on different compute grids: the crossing solves exactly."""
    ref_c = np.logspace(15, 21, 7)
    cand_c = np.logspace(15.5, 20.5, 11)
    ref = 4.0 - 0.10 * np.log(ref_c / 1e15)
    cand = 4.5 - 0.15 * np.log(cand_c / 1e15)  # equal at ln(C / 1e15) = 10
    assert crossover_compute(ref_c, ref, cand_c, cand) == pytest.approx(1e15 * math.exp(10), rel=1e-12)
    assert crossover_compute(ref_c, ref, cand_c, cand + 1.0) is None  # never below inside the shared range
    assert crossover_compute(ref_c, ref, cand_c, cand - 1.0) == pytest.approx(cand_c[0])  # below from the start
    assert crossover_compute([1e15, 1e16], [3, 2.9], [1e17, 1e18], [2, 1]) is None  # no shared compute
    shuffled = np.random.default_rng(0).permutation(cand_c.size)
    assert crossover_compute(ref_c, ref, cand_c[shuffled], cand[shuffled]) == pytest.approx(1e15 * math.exp(10))
