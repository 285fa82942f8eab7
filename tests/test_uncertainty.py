"""Standard errors (paired bootstrap), sigma calibration and the deployed fallback rule."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import r2_score as sk_r2

from snrmoe_dask.bootstrap import bootstrap_counts, r2_draws, rho_with_se, se
from snrmoe_dask.gates import GATE_SPECS, Gate, Standardizer
from snrmoe_dask.mixture import calibrate_sigma, calibrated_sigma, choose_fallback_tau


def test_bootstrap_r2_draws_equal_sklearn_on_the_resampled_rows():
    rng = np.random.default_rng(0)
    y = rng.normal(size=300)
    yhat = y + rng.normal(scale=0.7, size=300)
    counts = bootstrap_counts(300, 20, seed=1)
    assert counts.shape == (20, 300) and np.all(counts.sum(axis=1) == 300)
    draws = r2_draws(y, yhat, counts)
    for b in range(20):
        idx = np.repeat(np.arange(300), counts[b].astype(int))
        assert draws[b] == pytest.approx(sk_r2(y[idx], yhat[idx]), rel=1e-10)
    rows = np.arange(300) < 120  # a bin: the same counts restricted to its rows
    bin_draws = r2_draws(y, yhat, counts, rows)
    idx = np.repeat(np.arange(120), counts[3, :120].astype(int))
    assert bin_draws[3] == pytest.approx(sk_r2(y[:120][idx], yhat[:120][idx]), rel=1e-10)


def test_bootstrap_se_of_r2_matches_the_delta_method():
    """Gaussian y, yhat = E[y | x]: the asymptotic Var of R² (as of a squared correlation) is 4 R² (1 - R²)² / n."""
    rng = np.random.default_rng(2)
    n = 4000
    y = rng.normal(size=n)
    # yhat = E[y | x] for x = y + noise of equal variance: R² = 0.5
    yhat = 0.5 * (y + rng.normal(size=n))
    r2 = 0.5
    expected = np.sqrt(4 * r2 * (1 - r2) ** 2 / n)
    got = se(r2_draws(y, yhat, bootstrap_counts(n, 400, seed=3)))
    assert got == pytest.approx(expected, rel=0.2)


def test_paired_differences_cancel_and_rho_is_null_without_an_oracle_gain():
    rng = np.random.default_rng(4)
    y = rng.normal(size=500)
    glob = y + rng.normal(size=500)
    counts = bootstrap_counts(500, 100, seed=0)
    d = r2_draws(y, glob, counts)
    assert se(d - d) == 0.0
    point = (sk_r2(y, glob), sk_r2(y, glob), sk_r2(y, glob))
    r = rho_with_se(d, d, d, point)
    assert r["rho"] is None and "not larger than twice" in r["rho_null_reason"]
    oracle = y + 0.3 * rng.normal(size=500)
    deploy = y + 0.6 * rng.normal(size=500)
    r = rho_with_se(r2_draws(y, deploy, counts), d, r2_draws(y, oracle, counts),
                    (sk_r2(y, deploy), sk_r2(y, glob), sk_r2(y, oracle)))
    expected = (sk_r2(y, deploy) - sk_r2(y, glob)) / (sk_r2(y, oracle) - sk_r2(y, glob))
    assert r["rho"] == pytest.approx(expected) and 0 < r["rho_se"] < 0.2 and r["rho_null_reason"] is None


def _bounded_residuals(rng, n):
    """A bounded label (uniform on [0, 5]) estimated with an information that varies from row to row."""
    snr = rng.uniform(0.5, 9, n)
    info = np.clip(snr / 9 + rng.uniform(-0.3, 0.3, n), 0.02, 0.98)  # how much the flux says about y
    y = rng.uniform(0, 5, n)
    yhat = info * y + (1 - info) * 2.5 + rng.normal(size=n) * 0.3 * info
    sigma_raw = 0.6 * (1 - info) + 0.1  # the mixture's spread: right ordering, wrong size
    return y - yhat, sigma_raw, yhat, snr


def test_sigma_calibration_gives_gaussian_coverage_per_snr_bin_on_new_rows():
    """Light-tailed residuals of a bounded label: +-1 sigma covers 68 % and +-2 sigma 95 % on held-out rows."""
    rng = np.random.default_rng(5)
    r, s_raw, yhat, snr = _bounded_residuals(rng, 30000)
    held = np.arange(30000) >= 10000
    cal = calibrate_sigma(r, s_raw, yhat, snr, [2.0, 4.0, 7.0], min_rows=50, calibrate=held)
    rn, sn, yn, snrn = _bounded_residuals(np.random.default_rng(6), 20000)
    z = np.abs(rn) / calibrated_sigma(cal, yn, sn, snrn)
    raw = np.abs(rn) / sn
    for lo, hi in ((0, 2), (2, 4), (4, 7)):
        sel = (snrn > lo) & (snrn <= hi)
        assert np.mean(z[sel] <= 1) == pytest.approx(0.683, abs=0.03)
        assert np.mean(z[sel] <= 2) == pytest.approx(0.954, abs=0.02)
        assert abs(np.mean(raw[sel] <= 1) - 0.683) > 0.05  # the raw spread was not calibrated
    small = calibrate_sigma(r[:40], s_raw[:40], yhat[:40], snr[:40], [2.0, 4.0, 7.0], min_rows=50)
    assert small["scale"] == [small["overall"]["scale"]] * 4  # too few rows per bin: the overall fit
    nan_row = calibrated_sigma(cal, np.array([2.5]), np.array([0.3]), np.array([np.nan]))
    assert np.isfinite(nan_row).all()


def _gate(name: str) -> Gate:
    spec = GATE_SPECS[name]
    sc = Standardizer(np.zeros(1, bool), np.zeros(1), np.zeros(1), np.ones(1))
    return Gate(spec, "linear", {"W": np.zeros((2, 1)), "b": np.zeros(2)}, {i: sc for i in spec.inputs}, 2)


def test_fallback_is_kept_only_for_classifier_gates_and_only_where_it_helps():
    y = np.zeros(100)
    w = np.full((100, 2), 0.5)
    w[:50] = [0.9, 0.1]  # confident rows never fall back
    soft_bad = {"weights": w, "soft": np.r_[np.zeros(50), np.ones(50)]}  # the uncertain rows are wrong
    glob = np.zeros(100)
    assert choose_fallback_tau(_gate("deploy_snr_logreg"), 0.6, y, soft_bad, glob) == 0.6
    soft_good = {"weights": w, "soft": np.zeros(100)}
    assert choose_fallback_tau(_gate("deploy_snr_logreg"), 0.6, y, soft_good, glob + 1.0) == 0.0
    for name in ("deploy_snr_regress", "deploy_dual_concat", "deploy_dual_logitadd", "deploy_dual_temp"):
        assert choose_fallback_tau(_gate(name), 0.6, y, soft_bad, glob) == 0.0  # deployed as trained: soft


def test_coverage_standard_error_matches_the_spread_of_a_calibrated_sigma_over_test_draws():
    """The yardstick in ``metrics.json``: over many test draws with an exactly calibrated Gaussian σ, the spread
    of the measured coverage equals ``se_if_calibrated``, and the coverage itself is the plain share of rows."""
    from snrmoe_dask.evaluate import coverage

    rng = np.random.default_rng(3)
    n, draws = 300, 2000
    sigma = rng.uniform(0.2, 2.0, size=n)
    c1 = []
    for _ in range(draws):
        y = rng.normal(0.0, sigma)
        c = coverage(y, np.zeros(n), sigma, np.zeros(n, int), ["A"])
        assert c["1sigma"] == np.mean(np.abs(y) <= sigma) and c["per_snr_bin"]["A"]["n"] == n
        c1.append(c["1sigma"])
    se = c["se_if_calibrated"]
    assert abs(np.std(c1) / se["1sigma"] - 1) < 0.06
    assert abs(np.mean(c1) - 0.6827) < 3 * se["1sigma"] / np.sqrt(draws)
    assert se["2sigma"] == pytest.approx(np.sqrt(0.9545 * 0.0455 / n), rel=1e-3)
