"""Out-of-core predict: the dask layer against the NumPy kernels, labels optional, flags, bad stores."""

from __future__ import annotations

import json
import shutil

import dask
import numpy as np
import pytest
import xarray as xr
from conftest import write_raw

from snrmoe_dask.catalog import CatalogError, good_pixel_mask, open_catalog
from snrmoe_dask.cli import main
from snrmoe_dask.evaluate import evaluate_model
from snrmoe_dask.features import FEATURE_NAMES, block_features
from snrmoe_dask.gates import GATE_SPECS, mixture
from snrmoe_dask.metrics import r2_score
from snrmoe_dask.mixture import FLAG_BITS, gate_inputs, predict_dataset
from snrmoe_dask.predict import predict_catalog
from snrmoe_dask.stats import impute_bad_pixels
from snrmoe_dask.store import ModelError, load_model


def test_predict_is_lazy_and_matches_numpy(fit_catalog, fitted):
    model, cfg, _ = fitted
    ds = open_catalog(fit_catalog, config=cfg.catalog)
    with dask.config.set(scheduler="sync"):
        pred = predict_dataset(model, ds, "deploy_phys")
    assert pred["logg_pred"].chunks is not None  # a dask graph, nothing computed yet
    pred = pred.compute()
    np.testing.assert_array_equal(pred["spectrum"].values, ds["spectrum"].values)
    # the same numbers from the NumPy kernels on the whole cube in memory
    flux, err, wave = ds["flux"].values, ds["error"].values, ds["wavelength"].values
    feats = block_features(flux, err, None, wave)
    x = impute_bad_pixels(flux, good_pixel_mask(flux, err)).astype(np.float64)
    coef, icpt = model.projection()
    proj = x @ coef.T + icpt
    e = len(model.specs)
    gate = model.gates["deploy_phys"]
    w = gate.weights(gate_inputs(feats, proj[:, e:]))
    members = model.members("oracle_phys")
    tau = gate.info["fallback_tau"]  # chosen at fit time on the selection rows
    yhat = np.where(w.max(1) < tau, proj[:, model.index["global"]], mixture(w, proj[:, members]))
    np.testing.assert_allclose(pred["logg_pred"].values, yhat, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(pred["gate_weights"].values, w, rtol=1e-9, atol=1e-12)
    assert json.loads(pred.attrs["experts"]) == [model.specs[i].name for i in members]
    cliff = (pred["flags"].values & FLAG_BITS["snr_cliff"]) > 0
    np.testing.assert_array_equal(cliff, ~(feats[:, FEATURE_NAMES.index("snr_est")] > cfg.gates.snr_cliff))
    assert np.all(pred["logg_sigma"].values > 0)


def test_predict_agrees_with_evaluate_on_the_frozen_test(fit_catalog, fitted, tmp_path):
    model, cfg, _ = fitted
    with dask.config.set(scheduler="threads"):
        metrics = evaluate_model(model, fit_catalog, cfg, progress=False)
        out = predict_catalog(model, fit_catalog, tmp_path / "pred.zarr", cfg, progress=False)
    ds = open_catalog(fit_catalog, config=cfg.catalog)
    test = ds["frozen_test"].values
    r2 = r2_score(ds["logg"].values[test], out["logg_pred"].values[test])
    assert out.attrs["gate"] == model.default_gate
    np.testing.assert_allclose(r2, metrics["models"][model.default_gate]["r2"], rtol=1e-9)
    assert not (tmp_path / "pred.zarr.partial").exists()


def test_predict_cli_on_a_catalog_without_labels(fit_catalog, fitted, tmp_path, capsys):
    model, cfg, model_dir = fitted
    ds = open_catalog(fit_catalog, config=cfg.catalog).load()
    flux, err = ds["flux"].values[:300].copy(), ds["error"].values[:300].copy()
    flux[5] = np.nan  # a spectrum with no usable pixel
    path = write_raw(tmp_path / "nolabels.zarr", flux, err, wavelength=ds["wavelength"].values,
                     ids=ds["spectrum"].values[:300], chunk=100)
    assert "logg" not in xr.open_zarr(path, consolidated=False)
    rc = main(["predict", str(model_dir), str(path), "--out", str(tmp_path / "p.zarr"), "--gate", "deploy_joint",
               "--scheduler", "threads"])
    assert rc == 0
    out = xr.open_zarr(tmp_path / "p.zarr", consolidated=False).load()
    assert out.sizes["spectrum"] == 300 and out.sizes["expert"] == 36
    assert np.isnan(out["logg_pred"].values[5]) and out["flags"].values[5] & FLAG_BITS["too_many_masked"]
    assert np.isfinite(np.delete(out["logg_pred"].values, 5)).all()
    printed = capsys.readouterr().out
    assert "deploy_joint" in printed and "too_many_masked  1" in printed


def test_predict_refuses_wrong_grid_and_unknown_gate(fit_catalog, fitted, tmp_path):
    model, cfg, _ = fitted
    rng = np.random.default_rng(0)
    path = write_raw(tmp_path / "short.zarr", rng.normal(100, 1, (20, 50)), np.ones((20, 50)))
    with pytest.raises(CatalogError, match="wavelength grid"):
        predict_catalog(model, path, tmp_path / "x.zarr", cfg, progress=False)
    with pytest.raises(ValueError, match="unknown gate 'nope'"):
        predict_dataset(model, open_catalog(fit_catalog), "nope")


def test_tampered_gate_store_fails_validation(fitted, tmp_path):
    _, _, model_dir = fitted
    bad = tmp_path / "model"
    shutil.copytree(model_dir, bad)
    name = "deploy_dual_concat"
    g = xr.open_zarr(bad / "gates.zarr", group=name, consolidated=False).load()
    g["param_W1"] = g["param_W1"][:, :-1].rename({"param_W1_1": "cut"})  # wrong shape: 16 x 31
    g.to_zarr(bad / "gates.zarr", group=name, mode="w", zarr_format=3, consolidated=False)
    with pytest.raises(ModelError, match=name):
        load_model(bad)
    meta = json.loads((bad / "model.json").read_text())
    meta["gates"]["fitted"]["deploy_evil"] = meta["gates"]["fitted"].pop(name)
    (bad / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="unknown gate 'deploy_evil'"):
        load_model(bad)


@pytest.mark.parametrize("damage", ["no_bins", "no_snr_edges", "bad_n_pixels"])
def test_a_model_json_missing_what_the_stages_read_is_refused_at_load(fitted, tmp_path, damage):
    """model.json is validated by its typed description (ModelMeta): the field is named, in one line."""
    _, _, model_dir = fitted
    bad = tmp_path / "model"
    shutil.copytree(model_dir, bad)
    meta = json.loads((bad / "model.json").read_text())
    if damage == "no_bins":
        del meta["snr_bin_names"]
    elif damage == "no_snr_edges":
        del meta["bin_edges"]["snr_edges"]
    else:
        meta["n_pixels"] = "many"
    (bad / "model.json").write_text(json.dumps(meta))
    field = {"no_bins": "snr_bin_names", "no_snr_edges": "bin_edges", "bad_n_pixels": "n_pixels"}[damage]
    with pytest.raises(ModelError, match=f"'{field}'") as err:
        load_model(bad)
    assert "\n" not in str(err.value)


def test_every_gate_is_stored_and_reloaded(fitted):
    model, _, model_dir = fitted
    back = load_model(model_dir)
    assert set(back.gates) == set(GATE_SPECS)
    table = {"quality": np.abs(np.random.default_rng(1).normal(size=(5, 10))) + 1,
             "physical": np.random.default_rng(2).normal(size=(5, len(model.meta["gates"]["inputs"]["physical"])))}
    for name, gate in model.gates.items():
        np.testing.assert_array_equal(back.gates[name].weights(table), gate.weights(table))
