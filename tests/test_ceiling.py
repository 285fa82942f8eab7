"""The Bayes ceiling and the Fisher matrix against closed forms, and their place in evaluate."""

from __future__ import annotations

import dask
import numpy as np
import pytest
from conftest import write_raw
from scipy.stats import truncnorm

from snrmoe_dask.bins import median_snr_bin, phys_bin
from snrmoe_dask.ceiling import (
    PARAMS,
    STEPS,
    ceiling_summary,
    dmu_dlogg,
    fd_jacobian,
    fisher_crlb,
    forward_jacobian,
    posterior_block,
    posterior_moments,
)
from snrmoe_dask.cli import main
from snrmoe_dask.evaluate import evaluate_model
from snrmoe_dask.physics import ForwardModel, Instrument


def _gauss_line(wave, lam0=8000.0, width=1.5):
    return np.exp(-0.5 * ((wave - lam0) / width) ** 2)


def test_crlb_of_a_gaussian_line_amplitude_matches_the_closed_form():
    wave = np.linspace(7980, 8020, 400)
    g = _gauss_line(wave)
    c, a, sigma = 50.0, 0.4, 3.0

    def mu(amp, cont):
        return cont[:, None] * (1 - amp[:, None] * g[None, :])

    params = {"amp": np.array([a]), "cont": np.array([c])}
    jac = fd_jacobian(mu, params, ["amp", "cont"], {"amp": 1e-4, "cont": 1e-3})
    sig = np.full((1, wave.size), sigma)
    # closed form: F_AA = C^2 sum g^2, F_CC = sum (1 - A g)^2, F_AC = -C sum g (1 - A g), all / sigma^2
    f_aa = c**2 * np.sum(g**2) / sigma**2
    f_cc = np.sum((1 - a * g) ** 2) / sigma**2
    f_ac = -c * np.sum(g * (1 - a * g)) / sigma**2
    expected = f_cc / (f_aa * f_cc - f_ac**2)
    np.testing.assert_allclose(fisher_crlb(jac, sig, 0), [expected], rtol=1e-8)
    # continuum known: sigma^2 / (C^2 sum g^2) -> sigma^2 dlambda / (C^2 w sqrt(pi)) for fine sampling
    only_a = fisher_crlb(jac[:, :, :1], sig, 0)
    dlam = wave[1] - wave[0]
    np.testing.assert_allclose(only_a, [sigma**2 * dlam / (c**2 * 1.5 * np.sqrt(np.pi))], rtol=1e-6)
    assert expected > only_a[0]  # a nuisance parameter can only cost information


def test_singular_fisher_gives_infinite_crlb():
    jac = np.zeros((2, 10, 2))
    jac[:, :, 1] = 1.0  # the parameter of interest does not change the flux
    assert np.isinf(fisher_crlb(jac, np.ones((2, 10)), 0)).all()


def test_analytic_logg_derivative_matches_finite_differences():
    model = ForwardModel(Instrument(n_pixels=512))
    rng = np.random.default_rng(0)
    labels = {"teff": rng.uniform(3600, 6400, 6), "logg": rng.uniform(0.2, 4.8, 6), "mh": rng.uniform(-2, 0.5, 6),
              "alpha_m": rng.uniform(-0.2, 0.4, 6), "mag": rng.uniform(20.6, 22.4, 6)}
    jac, sigma = forward_jacobian(model, labels)
    analytic = dmu_dlogg(model, labels)
    scale = np.abs(analytic).max(axis=1, keepdims=True)
    np.testing.assert_allclose(jac[:, :, PARAMS.index("logg")] / scale, analytic / scale, atol=1e-5)
    assert sigma.shape == (6, 512) and STEPS["logg"] < 0.01


def test_float32_forward_model_agrees_with_float64():
    rng = np.random.default_rng(3)
    labels = [rng.uniform(3500, 6500, 32), rng.uniform(0, 5, 32), rng.uniform(-2.5, 0.75, 32),
              rng.uniform(-0.25, 0.5, 32), rng.uniform(20.5, 22.5, 32)]
    f64, s64 = ForwardModel()(*labels)
    f32, s32 = ForwardModel(precision="float32")(*labels)
    assert f64.dtype == np.float64 and f32.dtype == np.float32 and s32.dtype == np.float32
    np.testing.assert_allclose(f32, f64, rtol=3e-6)
    np.testing.assert_allclose(s32, s64, rtol=1e-6)
    with pytest.raises(ValueError, match="precision"):
        ForwardModel(precision="float16")


def test_ceiling_posteriors_in_float32_agree_with_float64():
    """The same draws weighted by a float32 or a float64 likelihood: posterior variances within 2e-5."""
    model = ForwardModel(Instrument(n_pixels=1024))
    sim = {"logg_range": [0.0, 5.0], "teff_range": [3500.0, 6500.0], "mh_range": [-2.5, 0.75],
           "alpha_m_range": [-0.25, 0.5], "mag_min": 20.5, "mag_max": 22.5}
    rng = np.random.default_rng(4)
    n = 6
    labels = np.column_stack([rng.uniform(0.5, 4.5, n), rng.uniform(3700, 6300, n), rng.uniform(-2, 0.5, n),
                              rng.uniform(-0.2, 0.4, n), rng.uniform(20.6, 22.4, n)])  # PARAMS order
    mu, sigma = model(labels[:, 1], labels[:, 0], labels[:, 2], labels[:, 3], labels[:, 4])
    flux = mu + sigma * rng.standard_normal(mu.shape)
    edges = {"teff_edges": [4500.0, 5500.0], "mh_edges": [-1.0, 0.0], "snr_edges": [2.0, 4.0, 7.0]}
    kw = dict(n_samples=256, prior_fraction=0.2, scale=1.5, seed=0, first=0)
    cell0 = (phys_bin(labels[:, 1], labels[:, 2], edges["teff_edges"], edges["mh_edges"]).astype(np.int64) * 4
             + median_snr_bin(mu / sigma, edges["snr_edges"]))
    out = {p: posterior_block(model, sim, flux, labels, cell0, edges, 4, precision=p, **kw)
           for p in ("float64", "float32")}
    assert np.isfinite(out["float64"]).all()
    np.testing.assert_allclose(out["float32"][:, [0, 2]], out["float64"][:, [0, 2]], rtol=2e-5)
    np.testing.assert_allclose(out["float32"][:, [1, 3]], out["float64"][:, [1, 3]], rtol=1e-4)


def _linear_case(rng, p=40, amp=(3.0, 1.0), s=1.0):
    """mu = A theta with orthogonal columns: the posterior under a box prior is a product of truncated normals."""
    a = np.linalg.qr(rng.normal(size=(p, 2)))[0] * np.asarray(amp)
    return a, (lambda th: (th @ a.T, np.full((th.shape[0], p), s)))


def test_bayes_mse_of_a_linear_gaussian_model_matches_the_truncated_normal_closed_form():
    """y = A theta + N(0, 1), theta uniform on a box: posterior var of theta_0 = truncnorm variance."""
    rng = np.random.default_rng(1)
    a, forward = _linear_case(rng)
    lo, hi = np.array([0.0, -1.0]), np.array([1.0, 1.0])
    est, exact = [], []
    for _ in range(120):
        theta = lo + rng.random(2) * (hi - lo)
        y = a @ theta + rng.normal(size=a.shape[0])
        r = posterior_moments(y, theta, forward, lo, hi, np.array([1e-3, 1e-3]), rng, n_samples=1500)
        sd, m = 1.0 / 3.0, (a[:, 0] @ y) / 9.0  # F_00 = 9, columns orthogonal
        exact.append(truncnorm.var((lo[0] - m) / sd, (hi[0] - m) / sd, loc=m, scale=sd))
        est.append(r["var"])
        assert r["ess"] > 100
    est, exact = np.array(est), np.array(exact)
    np.testing.assert_allclose(est, exact, rtol=0.25)  # per spectrum: Monte-Carlo error of 1500 samples
    np.testing.assert_allclose(est.mean(), exact.mean(), rtol=0.03)  # the Bayes MSE: the mean over spectra
    # the flat-prior CRLB (1/9) is far above the Bayes MSE here: the box carries information
    assert exact.mean() < 0.5 / 9.0


def test_bayes_mse_with_a_wide_box_tends_to_the_crlb_and_conditioning_on_a_cell_lowers_it():
    rng = np.random.default_rng(2)
    a, forward = _linear_case(rng, amp=(20.0, 10.0))
    lo, hi = np.array([-5.0, -5.0]), np.array([5.0, 5.0])
    theta = np.array([0.3, -0.2])
    y = a @ theta + rng.normal(size=a.shape[0])
    r = posterior_moments(y, theta, forward, lo, hi, np.array([1e-3, 1e-3]), rng, n_samples=4000,
                          cell=lambda th, mu, sig: (th[:, 0] > 0.3).astype(int), cell0=1)
    np.testing.assert_allclose(r["var"], 1 / 400.0, rtol=0.1)  # Gaussian posterior, CRLB = 1 / F_00
    np.testing.assert_allclose(r["mean"], (a[:, 0] @ y) / 400.0, atol=0.01)
    assert r["var_cell"] < r["var"] and r["mean_cell"] > 0.3


def test_posterior_is_found_far_from_the_proposal_centre():
    """The proposal is only placed at theta0: a wrong theta0 still gives the right posterior (the prior share)."""
    rng = np.random.default_rng(3)
    a, forward = _linear_case(rng, amp=(6.0, 6.0))
    lo, hi = np.array([0.0, 0.0]), np.array([1.0, 1.0])
    y = a @ np.array([0.8, 0.8]) + rng.normal(size=a.shape[0])
    r = posterior_moments(y, np.array([0.1, 0.1]), forward, lo, hi, np.array([1e-3, 1e-3]), rng, n_samples=3000)
    m = (a[:, 0] @ y) / 36.0
    np.testing.assert_allclose(r["var"], truncnorm.var(-m * 6, (1 - m) * 6, loc=m, scale=1 / 6), rtol=0.2)


def test_ceiling_summary_weights_bins_by_their_share_of_the_test_rows():
    logg = np.r_[np.linspace(0, 5, 300), np.linspace(0, 5, 100)]
    snr_b = np.r_[np.zeros(300, int), np.ones(100, int)]
    post = np.array([[1.0, 50, 0.5, 40]] * 10 + [[0.2, 50, 0.1, 40]] * 10)
    s = ceiling_summary(post, np.r_[np.zeros(10, int), np.ones(10, int)], logg, snr_b, ["X", "L"])
    var_x = np.var(logg[:300])
    assert s["flux"]["per_snr_bin"]["X"]["r2_max"] == pytest.approx(1 - 1.0 / var_x)
    assert s["flux"]["overall"]["r2_max"] == pytest.approx(1 - (0.75 * 1.0 + 0.25 * 0.2) / np.var(logg))
    assert s["flux_oracle_bins"]["overall"]["r2_max"] == pytest.approx(1 - (0.75 * 0.5 + 0.25 * 0.1) / np.var(logg))
    assert s["flux"]["per_snr_bin"]["X"]["r2_max_se"] == 0.0  # identical variances: no spread


def test_evaluate_adds_both_ceilings_and_efficiency(fit_catalog, fitted):
    model, cfg, _ = fitted
    cfg = cfg.model_copy(update={"ceiling": cfg.ceiling.model_copy(update={"spectra_per_snr_bin": 6,
                                                                           "samples": 128})})
    with dask.config.set(scheduler="threads"):
        metrics = evaluate_model(model, fit_catalog, cfg, progress=False)
    ceiling = metrics["ceiling"]
    for key in ("flux", "flux_oracle_bins"):
        c = ceiling[key]
        assert c["overall"]["n"] == metrics["n_test"]
        assert 0 < c["overall"]["r2_max"] <= 1 and c["overall"]["r2_max_se"] >= 0
    for name, m in metrics["models"].items():
        key = "flux_oracle_bins" if name.startswith("oracle") or name == "hierarchical" else "flux"
        assert m["ceiling"] == key
        top = ceiling[key]
        np.testing.assert_allclose(m["efficiency"]["overall"], m["r2"] / top["overall"]["r2_max"])
        for b, v in m["efficiency"]["per_snr_bin"].items():
            if v is not None:
                np.testing.assert_allclose(v, m["per_snr_bin"][b]["r2"] / top["per_snr_bin"][b]["r2_max"])


def test_ceiling_cli_needs_a_simulated_catalog(tmp_path, capsys, sim_catalog):
    rng = np.random.default_rng(0)
    n = 40
    path = write_raw(tmp_path / "real.zarr", rng.normal(100, 1, (n, 30)), np.ones((n, 30)),
                     logg=rng.uniform(0, 5, n), teff=rng.uniform(4000, 6000, n), mh=rng.uniform(-1, 0, n),
                     alpha_m=np.zeros(n), mag=np.full(n, 21.0), snr=np.full(n, 5.0))
    assert main(["ceiling", str(path), "--out", str(tmp_path / "c"), "--scheduler", "threads"]) == 2
    assert "needs a simulated catalog" in capsys.readouterr().err
    small = tmp_path / "small.yaml"
    small.write_text("ceiling: {spectra_per_snr_bin: 3, samples: 64}\n")
    assert main(["ceiling", str(sim_catalog), "--out", str(tmp_path / "c2"), "--rows", "all",
                 "--scheduler", "threads", "--config", str(small)]) == 0
    assert (tmp_path / "c2" / "ceiling.json").exists()
    assert "flux + oracle bins" in capsys.readouterr().out


@pytest.mark.parametrize("sigma", [1.0, 4.0])
def test_crlb_scales_with_noise_variance(sigma):
    wave = np.linspace(7980, 8020, 200)
    jac = (-50.0 * _gauss_line(wave))[None, :, None]
    base = fisher_crlb(jac, np.ones((1, wave.size)), 0)
    np.testing.assert_allclose(fisher_crlb(jac, np.full((1, wave.size), sigma), 0), base * sigma**2)


def test_weighted_moments_of_weights_that_underflow_when_squared():
    """A cell the posterior barely reaches has weights ~1e-200 of the round's best: their squares underflow, and
    the effective sample size used to divide by zero (it crashed the whole ceiling stage). The moments do not
    depend on the weights' scale."""
    from snrmoe_dask.ceiling import _weighted_moments

    rng = np.random.default_rng(0)
    x, w = rng.normal(size=50), rng.uniform(0.1, 1.0, 50)
    ref = _weighted_moments(w, x)
    tiny = _weighted_moments(w * 1e-200, x)
    np.testing.assert_allclose(tiny, ref, rtol=1e-12)
    assert ref[1] == pytest.approx(np.cov(x, aweights=w, bias=True))
    assert ref[2] == pytest.approx(w.sum() ** 2 / (w @ w))
    assert _weighted_moments(np.zeros(5), x[:5])[2] == 0.0
