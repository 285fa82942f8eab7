"""The leakage audit: finds a planted leak, passes a clean error vector, statistics-based CV is exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_raw
from sklearn.linear_model import Ridge

from snrmoe_dask.audit import AuditAccumulator, audit_catalog, r2_from_stats, representations_block, write_audit
from snrmoe_dask.catalog import open_catalog
from snrmoe_dask.cli import main
from snrmoe_dask.config import load_config
from snrmoe_dask.evaluate import r2_score


def _catalog(path, leak: bool, n=2400, p=64, seed=0):
    rng = np.random.default_rng(seed)
    logg = rng.uniform(0, 5, n)
    mag = rng.uniform(20.5, 22.5, n)
    level = 10 ** (0.2 * (mag - 20.5))  # fainter -> larger errors: S/N information
    error = level[:, None] * rng.uniform(0.9, 1.1, (n, p))
    if leak:
        error[:, [5, 17, 40]] *= (1 + 0.15 * logg)[:, None]  # the planted leak: 3 pixels encode logg
    flux = 100 + rng.normal(size=(n, p)) * error
    snr = np.median(100 / error, axis=1)
    return write_raw(path, flux, error, chunk=500, logg=logg, mag=mag, snr=snr,
                     teff=rng.uniform(4000, 6000, n), mh=rng.uniform(-1, 0, n))


@pytest.fixture(scope="module")
def cfg():
    return load_config(overrides={"catalog": {"test_size": 400}, "cluster": {"scheduler": "threads"}})


@pytest.mark.parametrize("leak", [True, False])
def test_audit_finds_a_planted_leak_and_passes_a_clean_vector(tmp_path, cfg, leak):
    ds = open_catalog(_catalog(tmp_path / "c.zarr", leak), config=cfg.catalog)
    doc = write_audit(audit_catalog(ds, cfg, progress=False), tmp_path / "audit", ds, cfg)
    full = doc["representations"]["full"]
    assert full["snr_r2"] > 0.9
    if leak:
        assert full["logg_r2"] > 0.3 and not full["pass"]
        top = {round(t["wavelength"], 3) for t in doc["top_pixels"][:3]}
        wave = ds["wavelength"].values
        assert top == {round(float(wave[i]), 3) for i in (5, 17, 40)}  # the importance points at the leak
        assert doc["checks"]["shuffle"]["logg_r2"] < 0.05  # permuting logg within magnitude bins kills it
    else:
        assert full["logg_r2"] < 0.05 and full["pass"]
    s3b = doc["representations"]["S3b"]
    assert s3b["snr_r2"] > 0.9
    assert set(doc["representations"]) == {"full", "S1", "S2", "S3b", "S4"}
    assert all(set(r) >= {"logg_r2", "snr_r2", "pass"} for r in doc["representations"].values())
    assert json.loads((tmp_path / "audit" / "audit.json").read_text()) == doc
    assert "| full |" in (tmp_path / "audit" / "audit.md").read_text()


def test_full_representation_matches_sklearn_ridge(tmp_path, cfg):
    """The statistics-based `full` fit equals sklearn's Ridge at the same alpha on the same rows."""
    ds = open_catalog(_catalog(tmp_path / "c.zarr", True), config=cfg.catalog)
    res = audit_catalog(ds, cfg, progress=False)
    mem = ds.load()
    train = mem["split"].values == 0
    test = mem["frozen_test"].values
    x = representations_block(mem["error"].values, mem["flux"].values, None, None)["full"]
    alpha = res["representations"]["full"]["logg_alpha"]
    ref = Ridge(alpha=alpha).fit(x[train], mem["logg"].values[train])
    r2 = r2_score(mem["logg"].values[test], ref.predict(x[test]))
    np.testing.assert_allclose(res["representations"]["full"]["logg_r2"], r2, rtol=1e-6)


def test_r2_from_statistics_equals_direct_r2():
    rng = np.random.default_rng(1)
    x = rng.normal(5, 2, (300, 6))
    y = x @ rng.normal(size=6) + rng.normal(size=300)
    group = rng.integers(0, 3, 300)
    acc = AuditAccumulator(3, 6, x.mean(0), x.mean(0))
    acc.add({"full": x, "S1": x}, np.column_stack([y, y, y]), group)
    st = acc.stats("full", "logg")
    w, b = rng.normal(size=6), 0.7
    sel = group == 2
    direct = r2_score(y[sel], x[sel] @ w + b)
    np.testing.assert_allclose(r2_from_stats(st, [2], w, b), direct, rtol=1e-10)


def test_audit_cli(tmp_path, capsys):
    path = _catalog(tmp_path / "c.zarr", True, n=1200)
    cfgf = tmp_path / "c.yaml"
    cfgf.write_text("catalog: {test_size: 200}\n")
    assert main(["audit", str(path), "--out", str(tmp_path / "a"), "--config", str(cfgf),
                 "--scheduler", "threads"]) == 0
    out = capsys.readouterr().out
    assert "| full |" in out and (tmp_path / "a" / "pixel_importance.zarr").exists()


def test_small_representations_are_regressed_on_the_routing_labels_linearly_and_not(fit_catalog, cfg, tmp_path):
    """The noiseless error model's quality statistics reveal the routing labels, and nonlinearly more so."""
    ds = open_catalog(fit_catalog, config=cfg.catalog)
    reps = audit_catalog(ds, cfg, progress=False)["representations"]
    for name in ("S2", "S3b", "S4"):
        assert set(reps[name]["by_label"]) == {"logg", "snr", "teff", "mh", "mag"}
    s3b = reps["S3b"]["by_label"]
    assert s3b["mag"]["hgb_r2"] > 0.5  # the error vector's level is the star's brightness
    assert s3b["teff"]["hgb_r2"] > 0.3  # its shape follows the continuum of the star's temperature
    noisy = reps["S4"]["by_label"]["teff"]  # one number (the norm) cannot say much about the temperature
    assert noisy["hgb_r2"] < s3b["teff"]["hgb_r2"]
    assert s3b["logg"]["ridge_r2"] == pytest.approx(reps["S3b"]["logg_r2"])  # the same fit, one source
    doc = write_audit({"representations": reps, "checks": {"shuffle": {"logg_r2": 0.0}, "mask_only": {"logg_r2": 0.0},
                                                           "group_cv_by_magnitude": {"mean_logg_r2": 0.0,
                                                                                     "mean_snr_r2": 1.0}},
                       "pixel_importance": np.ones(ds.sizes["wavelength"]), "n_train": 1, "n_test": 1},
                      tmp_path / "a", ds, cfg)
    s3b_doc = doc["representations"]["S3b"]
    assert s3b_doc["pass_nonlinear"] == (s3b["logg"]["hgb_r2"] < 0.05 and s3b["snr"]["hgb_r2"] >= 0.5)
    assert "pass with gradient boosting" in (tmp_path / "a" / "audit.md").read_text()
