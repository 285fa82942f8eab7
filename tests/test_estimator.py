"""The scikit-learn estimator: conformance, agreement with Ridge, and with the out-of-core predict."""

from __future__ import annotations

import dask
import numpy as np
import pytest
from sklearn.linear_model import Ridge
from sklearn.utils.estimator_checks import check_estimator

from snrmoe_dask.catalog import open_catalog
from snrmoe_dask.estimator import SNRMoERegressor
from snrmoe_dask.mixture import predict_dataset


def test_passes_sklearn_check_estimator():
    results = check_estimator(SNRMoERegressor(), on_fail=None)
    failed = [(r["check_name"], repr(r["exception"])) for r in results if r["status"] == "failed"]
    assert not failed
    assert len(results) > 40


def test_global_expert_is_sklearn_ridge_on_the_expert_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(100, 5, (600, 20)).astype(np.float32).astype(np.float64)  # flux is float32 in a catalog
    y = x[:, :3].sum(1) * 0.1 + rng.normal(0, 0.5, 600)
    est = SNRMoERegressor(gate_fraction=0.25, min_cell_rows=10).fit(x, y, snr=rng.uniform(1, 10, 600))
    from snrmoe_dask.split import id_hash

    rows = ~(id_hash(np.arange(600), 0, stream=3) < 0.25)
    g = est.expert_names_.index("global")
    ref = Ridge(alpha=est.alpha_[g]).fit(x[rows], y[rows])
    np.testing.assert_allclose(est.coef_[g], ref.coef_, rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(est.intercept_[g], ref.intercept_, rtol=1e-6)
    assert est.score(x, y) > 0.5


def _fit_on_train_rows(catalog, gate: str):
    """The estimator fitted on the train + val rows of a catalog; returns (estimator, dataset, test mask)."""
    ds = open_catalog(catalog).load()
    train = ds["split"].values != 2
    kw = {k: ds[k].values[train] for k in ("snr", "teff", "mh")}
    est = SNRMoERegressor(gate=gate, min_cell_rows=10).fit(
        ds["flux"].values[train], ds["logg"].values[train], error=ds["error"].values[train],
        wavelength=ds["wavelength"].values, **kw)
    return est, ds, ~train


def test_fit_on_simulated_spectra_beats_nothing_and_reports_uncertainty(fit_catalog):
    est, ds, test = _fit_on_train_rows(fit_catalog, "deploy_phys")
    score = est.score(ds["flux"].values[test], ds["logg"].values[test])
    assert score > 0.0  # better than predicting the mean: 96-pixel spectra at S/N ~ 3 carry some logg
    out = est.predict_dist(ds["flux"].values[test], error=ds["error"].values[test])
    assert out["gate_weights"].shape == (int(test.sum()), 9)
    np.testing.assert_allclose(out["gate_weights"].sum(1), 1.0)
    assert np.all(out["logg_sigma"] > 0)


def test_from_model_store_predicts_like_the_out_of_core_path(fit_catalog, fitted):
    model, cfg, model_dir = fitted
    est = SNRMoERegressor.from_model(model_dir, gate="deploy_dual_temp")
    ds = open_catalog(fit_catalog, config=cfg.catalog)
    with dask.config.set(scheduler="threads"):
        ref = predict_dataset(model, ds, "deploy_dual_temp").compute()
    mem = ds.load()
    got = est.predict(mem["flux"].values, error=mem["error"].values)
    np.testing.assert_allclose(got, ref["logg_pred"].values, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="unknown gate"):
        SNRMoERegressor.from_model(model_dir, gate="nope")


def test_estimator_sigma_is_calibrated_on_held_out_spectra(fit_catalog):
    est, ds, test = _fit_on_train_rows(fit_catalog, "deploy_snr_logreg")
    out = est.predict_dist(ds["flux"].values[test], error=ds["error"].values[test])
    z = np.abs(ds["logg"].values[test] - out["logg_pred"]) / out["logg_sigma"]
    # a few hundred test spectra: +-1 sigma and +-2 sigma near 68 % and 95 % within sampling error
    assert 0.60 < np.mean(z <= 1) < 0.76 and 0.90 < np.mean(z <= 2) < 0.99
    assert est.gate_.info["sigma_calibration"]["n_calibration_rows"] > 100
