"""The Fisher ceiling against closed forms, and its place in evaluate."""

from __future__ import annotations

import dask
import numpy as np
import pytest
from conftest import write_raw

from snrmoe_dask.ceiling import PARAMS, STEPS, bayes_mse, dmu_dlogg, fd_jacobian, fisher_crlb, forward_jacobian, r2_max
from snrmoe_dask.cli import main
from snrmoe_dask.model import evaluate_model
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


def test_bayes_bound_is_between_zero_and_the_prior():
    v = 2.0
    crlb = np.array([0.0, 0.5, 2.0, 1e9, np.inf])
    mse = bayes_mse(crlb, v)
    np.testing.assert_allclose(mse, [0.0, 0.4, 1.0, v * 1e9 / (1e9 + v), v])
    np.testing.assert_allclose(r2_max(crlb, v), 1 - mse / v)


def test_evaluate_adds_ceiling_and_efficiency(fit_catalog, fitted):
    model, cfg, _ = fitted
    with dask.config.set(scheduler="threads"):
        metrics = evaluate_model(model, fit_catalog, cfg, progress=False)
    ceiling = metrics["ceiling"]
    assert ceiling["overall"]["n"] == metrics["n_test"]
    assert 0 < ceiling["overall"]["r2_max"] <= 1
    for m in metrics["models"].values():
        eff = m["efficiency"]
        np.testing.assert_allclose(eff["overall"], m["r2"] / ceiling["overall"]["r2_max"])
        for b, v in eff["per_snr_bin"].items():
            top = ceiling["per_snr_bin"][b]["r2_max"]
            if v is not None:
                np.testing.assert_allclose(v, m["per_snr_bin"][b]["r2"] / top)


def test_ceiling_cli_needs_a_simulated_catalog(tmp_path, capsys, sim_catalog):
    rng = np.random.default_rng(0)
    n = 40
    path = write_raw(tmp_path / "real.zarr", rng.normal(100, 1, (n, 30)), np.ones((n, 30)),
                     logg=rng.uniform(0, 5, n), teff=rng.uniform(4000, 6000, n), mh=rng.uniform(-1, 0, n),
                     alpha_m=np.zeros(n), mag=np.full(n, 21.0), snr=np.full(n, 5.0))
    assert main(["ceiling", str(path), "--out", str(tmp_path / "c"), "--scheduler", "threads"]) == 2
    assert "needs a simulated catalog" in capsys.readouterr().err
    assert main(["ceiling", str(sim_catalog), "--out", str(tmp_path / "c2"), "--rows", "all",
                 "--scheduler", "threads"]) == 0
    assert (tmp_path / "c2" / "ceiling.json").exists()


@pytest.mark.parametrize("sigma", [1.0, 4.0])
def test_crlb_scales_with_noise_variance(sigma):
    wave = np.linspace(7980, 8020, 200)
    jac = (-50.0 * _gauss_line(wave))[None, :, None]
    base = fisher_crlb(jac, np.ones((1, wave.size)), 0)
    np.testing.assert_allclose(fisher_crlb(jac, np.full((1, wave.size), sigma), 0), base * sigma**2)
