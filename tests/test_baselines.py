"""The whitened and conditional baselines: from the one pass, checked against scikit-learn."""

from __future__ import annotations

import json

import dask
import numpy as np
import pytest
from conftest import fit_cfg, train_cells
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score

from snrmoe_dask.baselines import TERM_NAMES, BaselineStats, conditional_terms
from snrmoe_dask.catalog import good_pixel_mask, open_catalog
from snrmoe_dask.evaluate import evaluate_model
from snrmoe_dask.features import block_features
from snrmoe_dask.reduce import one_pass
from snrmoe_dask.split import TRAIN
from snrmoe_dask.stats import impute_bad_pixels
from snrmoe_dask.store import ModelError, load_model


@pytest.fixture(scope="module")
def arrays(fit_catalog, fitted):
    _, cfg, _ = fitted
    ds = open_catalog(fit_catalog, config=cfg.catalog).load()
    flux, err = ds["flux"].values, ds["error"].values
    good = good_pixel_mask(flux, err)
    usable = good.sum(axis=1) >= np.ceil(cfg.catalog.min_good_fraction * flux.shape[1])
    train = (ds["split"].values == TRAIN) & usable
    feats = block_features(flux, err, None, ds["wavelength"].values)
    return {"ds": ds, "flux": flux, "err": err, "good": good, "train": train, "feats": feats,
            "y": ds["logg"].values}


def _baselines(model):
    names = json.loads(model.baselines.attrs["baseline"])
    return {name: model.baselines.isel(baseline=i) for i, name in enumerate(names)}


def test_whitened_matches_sklearn_on_flux_over_error(fitted, arrays):
    model, _, _ = fitted
    b = _baselines(model)["whitened"]
    a = arrays
    # the input is float32 flux / float32 error, as stored
    xw = np.where(a["good"], a["flux"].astype(np.float32) / a["err"].astype(np.float32), 0.0)[a["train"]]
    ref = Ridge(alpha=float(b["alpha"])).fit(xw.astype(np.float64), a["y"][a["train"]])
    np.testing.assert_allclose(b["coef"].values, ref.coef_, rtol=1e-6, atol=1e-9 * np.abs(ref.coef_).max())
    np.testing.assert_allclose(float(b["intercept"]), ref.intercept_, rtol=1e-6)
    assert float(b["n"]) == a["train"].sum()


def test_conditional_matches_sklearn_on_flux_and_snr_terms(fitted, arrays):
    model, _, _ = fitted
    b = _baselines(model)["conditional"]
    a = arrays
    x = impute_bad_pixels(a["flux"], a["good"]).astype(np.float64)[a["train"]]
    z = np.column_stack([a["feats"][a["train"], 10],
                         a["feats"][a["train"], 10, None] * np.nan_to_num(a["feats"][a["train"], 11:22])])
    # independent closed form of the documented column scaling: var(z_j) -> mean pixel variance
    # (a constant column, e.g. a line outside this short grid, keeps scale 1 and gets coefficient 0)
    scale = np.sqrt(z.var(axis=0) / x.var(axis=0).mean())
    assert (scale == 0).sum() >= 1
    scale[scale == 0] = 1.0
    ref = Ridge(alpha=float(b["alpha"])).fit(np.hstack([x, z / scale]), a["y"][a["train"]])
    p = x.shape[1]
    np.testing.assert_allclose(b["coef"].values, ref.coef_[:p], rtol=1e-6, atol=1e-9 * np.abs(ref.coef_).max())
    np.testing.assert_allclose(model.baselines["term_coef"].values, ref.coef_[p:] / scale, rtol=1e-6,
                               atol=1e-9 * np.abs(ref.coef_[p:] / scale).max())
    np.testing.assert_allclose(float(b["intercept"]), ref.intercept_, rtol=1e-6)
    assert len(TERM_NAMES) == z.shape[1] == 12


def test_conditional_terms_are_snr_times_line_indices():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(5, 26))
    feats[0, 12] = np.nan  # an index with no good pixel in its windows contributes 0
    z = conditional_terms(feats)
    assert z.shape == (5, 12)
    np.testing.assert_array_equal(z[:, 0], feats[:, 10])
    np.testing.assert_allclose(z[1:, 1:], feats[1:, 10, None] * feats[1:, 11:22])
    assert z[0, 2] == 0.0


def test_evaluate_scores_both_baselines(fit_catalog, fitted, arrays):
    model, cfg, _ = fitted
    with dask.config.set(scheduler="threads"):
        metrics = evaluate_model(model, fit_catalog, cfg, progress=False)
    a = arrays
    test = a["ds"]["frozen_test"].values & (a["good"].sum(axis=1) >= 48)
    bl = _baselines(model)
    xw = np.where(a["good"], a["flux"].astype(np.float32) / a["err"].astype(np.float32), 0.0)[test]
    white = xw @ bl["whitened"]["coef"].values + float(bl["whitened"]["intercept"])
    x = impute_bad_pixels(a["flux"], a["good"]).astype(np.float64)[test]
    cond = (x @ bl["conditional"]["coef"].values + conditional_terms(a["feats"][test]) @
            model.baselines["term_coef"].values + float(bl["conditional"]["intercept"]))
    for name, yhat in (("whitened", white), ("conditional", cond)):
        m = metrics["models"][name]
        assert m["r2"] == pytest.approx(r2_score(a["y"][test], yhat), abs=1e-9)
        assert set(m["per_snr_bin"]) == {"X", "L", "M", "H"}
        assert m["baseline"] is True


def _stats(ds, chunk, chains):
    ds = ds.chunk({"spectrum": chunk})
    cells = train_cells(ds)
    stats, _, bstats, _ = one_pass(ds, ds["logg"].values, cells, n_cells=36, chains=chains, flush_rows=64,
                                precision="float64", baselines=("whitened", "conditional"))
    with dask.config.set(scheduler="threads"):
        return dask.compute(stats, bstats)


def test_baseline_statistics_are_chunk_invariant_and_round_trip(fit_catalog, tmp_path):
    ds = open_catalog(fit_catalog)
    (_, b1), (_, b2) = _stats(ds, 256, 1), _stats(ds, 700, 3)
    w1, w2 = b1.whitened.cells([0]), b2.whitened.cells([0])
    np.testing.assert_allclose(w2.gram, w1.gram, rtol=1e-9, atol=1e-9 * np.abs(w1.gram).max())
    np.testing.assert_allclose(w2.xty, w1.xty, rtol=1e-9, atol=1e-9 * np.abs(w1.xty).max())
    c1, c2 = b1.cross, b2.cross
    if not np.array_equal(c1.shift, c2.shift):  # different first chunks -> different shifts
        c2 = type(c1).zeros(c1.shift, c1.sz.size) + c2
    for k in ("sz", "szz", "sxz", "szy"):
        np.testing.assert_allclose(getattr(c2, k), getattr(c1, k), rtol=1e-9, atol=1e-9 * np.abs(getattr(c1, k)).max())
    b1.to_zarr(tmp_path / "b")
    back = BaselineStats.from_zarr(tmp_path / "b")
    np.testing.assert_array_equal(back.cross.sxz, b1.cross.sxz)
    np.testing.assert_array_equal(back.whitened.xtx, b1.whitened.xtx)


def test_no_baselines_when_config_is_empty(fit_catalog, tmp_path):
    from snrmoe_dask.fit import fit_model

    cfg = fit_cfg(precision="float64", baselines=[])
    with dask.config.set(scheduler="threads"):
        model = fit_model(fit_catalog, tmp_path / "m", cfg, progress=False)
        metrics = evaluate_model(model, fit_catalog, cfg, progress=False)
    assert model.baselines is None and "whitened" not in metrics["models"]
    assert not (tmp_path / "m" / "baselines.zarr").exists()


def test_tampered_baselines_fail_to_load(fitted, tmp_path):
    import shutil

    _, _, model_dir = fitted
    copy = tmp_path / "m"
    shutil.copytree(model_dir, copy)
    meta = json.loads((copy / "model.json").read_text())
    meta["baselines"]["fitted"] = ["conditional"]
    (copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="baselines.zarr"):
        load_model(copy)
