"""Power-law tail fits: recovery on synthetic data, agreement with plain loops and the powerlaw package,
degenerate spectra."""
import math

import numpy as np
import pytest

from analysis.errors import AlphascopeError
from analysis.powerlaw import (
    MIN_TAIL,
    SCAN_MAX,
    FitError,
    PowerLawFit,
    fit_power_law,
    histogram_peak,
    positive_eigs,
    scan_candidates,
)


def pareto(alpha, n, seed, xmin=1.0):
    """Samples with density ∝ x^-alpha on [xmin, inf) by inverse transform."""
    u = np.random.default_rng(seed).random(n)
    return xmin * (1 - u) ** (-1 / (alpha - 1))


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.0])
@pytest.mark.parametrize("rule", ["scan", "peak", "median"])
def test_hill_recovers_pareto_alpha(alpha, rule):
    # n = 5000: the MLE's standard error is (alpha-1)/sqrt(n_tail) <= 0.06 even for the median rule's
    # 2500-value tail, so 0.2 is > 3 standard errors.
    x = pareto(alpha, 5000, seed=int(alpha * 10))
    fit = fit_power_law(x, rule)
    assert fit.status == "ok"
    assert abs(fit.alpha - alpha) < 0.2, fit
    assert 0 <= fit.ks_distance < 0.05



def test_alpha_stderr_matches_the_spread_over_samples():
    # the median rule keeps a tail of half the values, so the spread comes from the sample alone: the
    # reported standard error must predict the seed-to-seed standard deviation of alpha
    fits = [fit_power_law(pareto(3.0, 400, seed=s), "median") for s in range(60)]
    spread = float(np.std([f.alpha for f in fits], ddof=1))
    stderr = float(np.mean([f.alpha_stderr for f in fits]))
    assert fits[0].alpha_stderr == pytest.approx((fits[0].alpha - 1) / math.sqrt(fits[0].n_tail))
    assert 0.7 < spread / stderr < 1.4, (spread, stderr)
    assert math.isnan(PowerLawFit.failed("all zero").alpha_stderr)

def test_scan_finds_the_start_of_the_tail():
    # a log-normal bulk below 10, a Pareto(alpha=2.5) tail above: xmin should land near 10
    rng = np.random.default_rng(1)
    bulk = np.exp(rng.normal(0.5, 0.5, 3000)).clip(max=9.9)
    x = np.concatenate([bulk, pareto(2.5, 1500, seed=2, xmin=10.0)])
    fit = fit_power_law(x, "scan")
    assert 8 < fit.xmin < 20
    assert abs(fit.alpha - 2.5) < 0.25


def loop_fit(x, candidates):
    """The textbook per-candidate loop (Clauset et al.) the vectorized code must reproduce."""
    best = None
    for i in candidates:
        tail = x[i:]
        n = len(tail)
        alpha = 1 + n / np.sum(np.log(tail / x[i]))
        d = np.max(np.abs(1 - (tail / x[i]) ** (1 - alpha) - np.arange(n) / n)) if alpha > 1 else 1.0
        if best is None or d < best[2]:
            best = (alpha, x[i], d, n)
    return best


def test_vectorized_scan_equals_plain_loop():
    x = np.sort(np.random.default_rng(3).lognormal(0, 1.2, 700))
    fit = fit_power_law(x, "scan", min_tail=10)
    alpha, xmin, d, n = loop_fit(x, range(len(x) - 10 + 1))
    assert fit.alpha == pytest.approx(alpha, rel=1e-10)
    assert fit.xmin == xmin and fit.n_tail == n
    assert fit.ks_distance == pytest.approx(d, rel=1e-10)


def test_peak_rule_searches_only_near_the_histogram_peak():
    x = np.sort(np.random.default_rng(4).lognormal(0, 1.0, 2000))
    peak = histogram_peak(x)
    fit = fit_power_law(x, "peak")
    assert 0.95 * peak <= fit.xmin < 1.5 * peak
    cands = [i for i, v in enumerate(x[:-1]) if 0.95 * peak <= v < 1.5 * peak]
    alpha, xmin, _, _ = loop_fit(x, cands)
    assert fit.xmin == xmin and fit.alpha == pytest.approx(alpha, rel=1e-10)


def test_median_rule_uses_the_median_eigenvalue():
    x = np.arange(1.0, 102.0)
    fit = fit_power_law(x, "median")
    assert fit.xmin == 51.0 and fit.n_tail == 51


def test_alpha_matches_powerlaw_package_at_the_same_xmin():
    powerlaw = pytest.importorskip("powerlaw")
    x = pareto(3.0, 3000, seed=5) * np.random.default_rng(6).uniform(0.9, 1.1, 3000)
    fit = fit_power_law(x, "scan")
    ref = powerlaw.Fit(x, xmin=fit.xmin, verbose=False)
    assert fit.alpha == pytest.approx(ref.power_law.alpha, rel=1e-6)


@pytest.mark.parametrize(
    "eigs, status",
    [
        ([], "empty"),
        ([1.0, np.nan, 2.0, 3.0, 4.0, 5.0], "non-finite"),
        ([1.0, np.inf, 2.0, 3.0, 4.0, 5.0], "non-finite"),
        (np.zeros(50), "all zero"),
        ([0, 0, 0, 1.0, 2.0, 3.0], "too few eigenvalues"),
        (np.full(20, 2.0), "fit failed"),  # all equal: no tail to fit
    ],
)
def test_degenerate_spectra_give_a_status_not_an_exception(eigs, status):
    fit = fit_power_law(np.asarray(eigs, dtype=float), "peak")
    assert isinstance(fit, PowerLawFit)
    assert fit.status == status
    assert math.isnan(fit.alpha)


def test_unknown_rule_or_bad_min_tail_is_a_typed_error():
    with pytest.raises(FitError, match="Unknown fit"):
        fit_power_law([1.0, 2.0, 3.0], "best")
    for bad in (1, -5, 2.5, True):
        with pytest.raises(FitError, match="min_tail must be an integer >= 2"):
            fit_power_law(np.arange(1.0, 50.0), "scan", min_tail=bad)
    with pytest.raises(FitError, match="min_tail is read by the scan fit only, and the fit is peak: leave it at 10"):
        fit_power_law(np.arange(1.0, 50.0), "peak", min_tail=3)  # ignored, it would also key a cache of its own
    assert issubclass(FitError, AlphascopeError) and issubclass(FitError, ValueError)


def test_tiny_eigenvalues_count_as_zero_relative_to_the_largest():
    x = np.array([1e-12, 1e-11] + list(np.linspace(1e-3, 1e-2, 30)))
    assert len(positive_eigs(x)) == 30
    assert fit_power_law(x * 1e-6, "scan").status == "ok"  # a tiny-norm matrix still gets a fit


def test_a_long_spectrum_is_scanned_at_evenly_spaced_ranks():
    """FARMS pools hundreds of thousands of eigenvalues: the scan tries SCAN_MAX candidates, not all of them,
    and still finds the tail's exponent."""
    x = np.sort(1.0 + np.random.default_rng(0).pareto(2.0, 200_000))  # density exponent alpha = 3
    cand = scan_candidates(x)
    assert len(cand) == SCAN_MAX and cand[0] == 0 and cand[-1] == len(x) - MIN_TAIL
    assert fit_power_law(x, "scan").alpha == pytest.approx(3.0, abs=0.15)
    assert len(scan_candidates(x[:SCAN_MAX])) == SCAN_MAX - MIN_TAIL + 1  # a shorter one: every rank
