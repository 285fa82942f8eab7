"""Hostile inputs that need more than one row of the bad-input table (tests/bad_inputs.py) to pin down."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr

from snrmoe_dask.cli import main
from snrmoe_dask.config import ConfigError, load_config


@pytest.mark.parametrize("edges", [[float("nan"), 4.0, 7.0], [2.0, float("inf"), 7.0], [2.0, 4.0, 4.0]])
def test_bin_edges_must_be_finite_and_increasing(edges):
    with pytest.raises(ConfigError, match="strictly increasing list of finite numbers"):
        load_config(overrides={"catalog": {"snr_edges": edges}})


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_a_warped_grid_with_the_same_endpoints_is_refused(fitted, fit_catalog, tmp_path, capsys, command):
    _, _, model_dir = fitted
    warped = tmp_path / "warped.zarr"
    shutil.copytree(fit_catalog, warped)
    wave = zarr.open_array(str(warped / "wavelength"), mode="r+")
    w = np.asarray(wave[:], np.float64)
    t = (w - w[0]) / (w[-1] - w[0])
    wave[:] = w[0] + (w[-1] - w[0]) * t**1.2  # same pixel count and endpoints, interior moved by up to ~6 pixels
    argv = [command, str(model_dir), str(warped), "--out", str(tmp_path / "out"), "--scheduler", "threads"]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "wavelength grid differs from the model's" in err[0], err
    assert not (tmp_path / "out").exists()
    # within the stated tolerance (a rounding of the grid) it is the same grid
    wave[:] = w + 1e-4 * np.median(np.diff(w))
    assert main([command, str(model_dir), str(warped), "--out", str(tmp_path / "ok"), "--scheduler", "threads"]) == 0


def test_nan_in_the_true_snr_is_refused_with_its_count_by_every_command_that_bins_by_it(fitted, fit_catalog,
                                                                                         tmp_path, capsys):
    _, _, model_dir = fitted
    cat = tmp_path / "nan_snr.zarr"
    shutil.copytree(fit_catalog, cat)
    snr = zarr.open_array(str(cat / "snr"), mode="r+")
    v = np.asarray(snr[:])
    v[5:42] = np.nan
    snr[:] = v
    runs = {"info": ["info", str(cat)],
            "fit": ["fit", str(cat), "--out", str(tmp_path / "m")],
            "evaluate": ["evaluate", str(model_dir), str(cat), "--out", str(tmp_path / "e.json")]}
    for name, argv in runs.items():
        assert main(argv + ["--scheduler", "threads"]) == 2, name
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(err) == 1 and "label 'snr' has 37 NaN/inf values" in err[0] and str(cat) in err[0], (name, err)
    assert not (tmp_path / "m").exists() and not (tmp_path / "e.json").exists()
    # predict does not bin by the true S/N: it still runs
    assert main(["predict", str(model_dir), str(cat), "--out", str(tmp_path / "p.zarr"), "--scheduler", "threads"]) == 0


def test_an_unreachable_scheduler_is_one_line_within_the_configured_timeout(fit_catalog, tmp_path, capsys):
    import time

    cfg = tmp_path / "c.yaml"
    cfg.write_text("cluster: {connect_timeout: 1}\n")
    t0 = time.perf_counter()
    assert main(["info", str(fit_catalog), "--config", str(cfg), "--scheduler", "tcp://127.0.0.1:1"]) == 2
    assert time.perf_counter() - t0 < 15
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["snrmoe info: error: cannot reach the Dask scheduler at tcp://127.0.0.1:1 within 1 s "
                   "(cluster.connect_timeout): OSError"]


def test_evaluate_takes_the_split_from_the_model_and_refuses_a_conflicting_salt(fitted, fit_catalog, tmp_path, capsys):
    import json

    model, cfg, model_dir = fitted  # fitted with catalog.test_size 250 and the shipped salt
    cfg_file = tmp_path / "salt.yaml"
    cfg_file.write_text("catalog: {split_salt: 1}\n")
    argv = ["evaluate", str(model_dir), str(fit_catalog), "--scheduler", "threads"]
    assert main(argv + ["--config", str(cfg_file), "--out", str(tmp_path / "bad.json")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "catalog.split_salt is 1 in this config, but the model was fitted with 0" in err[0], err
    assert not (tmp_path / "bad.json").exists()
    # without a config the shipped test_size (10,000) does not replace the model's 250: the same frozen test
    assert main(argv + ["--out", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["n_test"] + m["n_test_excluded_unusable"] == 250


def _tamper_json(model_dir, edit):
    import json

    meta = json.loads((model_dir / "model.json").read_text())
    edit(meta)
    (model_dir / "model.json").write_text(json.dumps(meta))


TAMPERED = {
    "coef deleted": (lambda d: shutil.rmtree(d / "experts.zarr" / "coef"), "variable 'coef' is missing"),
    "intercept deleted": (lambda d: shutil.rmtree(d / "experts.zarr" / "intercept"), "variable 'intercept' is missing"),
    "resid_var deleted": (lambda d: shutil.rmtree(d / "experts.zarr" / "resid_var"), "variable 'resid_var' is missing"),
    "pca_mean deleted": (lambda d: shutil.rmtree(d / "experts.zarr" / "pca_mean"), "variable 'pca_mean' is missing"),
    "pca_components deleted": (lambda d: shutil.rmtree(d / "experts.zarr" / "pca_components"),
                               "variable 'pca_components' is missing"),
    "snr_bin_names shortened": (lambda d: _tamper_json(d, lambda m: m.update(snr_bin_names=m["snr_bin_names"][:-1])),
                                "'snr_bin_names' has 3 names for 4 S/N bins"),
    "string fallback_tau": (lambda d: _tamper_json(d, lambda m: m["gates"].update(fallback_tau="0.3")),
                            "'gates.fallback_tau' is '0.3'; it must be a number"),
    "string gate fallback_tau": (lambda d: _tamper_json(
        d, lambda m: m["gates"]["fitted"]["deploy_joint"].update(fallback_tau="high")),
        "'gates.fitted.deploy_joint.fallback_tau' is 'high'"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_a_tampered_model_store_is_refused_naming_the_file(fitted, fit_catalog, tmp_path, capsys, case):
    from snrmoe_dask.store import ModelError, load_model

    _, _, model_dir = fitted
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    tamper, message = TAMPERED[case]
    tamper(copy)
    with pytest.raises(ModelError, match="model"):
        load_model(copy)
    assert main(["predict", str(copy), str(fit_catalog), "--out", str(tmp_path / "p.zarr"),
                 "--scheduler", "threads"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and str(copy) in err[0] and message in err[0], err


def test_a_zarr_v2_catalog_works_for_every_command_and_fits_as_its_v3_copy(fit_catalog, tmp_path):
    import json

    import xarray as xr

    ds = xr.open_zarr(fit_catalog, consolidated=False)
    for var in ds.variables.values():
        var.encoding.clear()
    v2 = tmp_path / "v2.zarr"
    ds.to_zarr(v2, zarr_format=2, mode="w-", consolidated=True)
    assert (v2 / ".zgroup").is_file()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("catalog: {test_size: 250}\nfit: {min_cell_rows: 10}\nceiling: {spectra_per_snr_bin: 3}\n")
    common = ["--config", str(cfg), "--scheduler", "threads"]
    for cat, out in ((v2, tmp_path / "m2"), (fit_catalog, tmp_path / "m3")):
        assert main(["fit", str(cat), "--out", str(out)] + common) == 0
        assert main(["evaluate", str(out), str(cat), "--out", str(out) + ".json"] + common) == 0
    e2 = xr.open_zarr(tmp_path / "m2" / "experts.zarr", consolidated=False)
    e3 = xr.open_zarr(tmp_path / "m3" / "experts.zarr", consolidated=False)
    np.testing.assert_array_equal(e2["coef"].values, e3["coef"].values)
    m2, m3 = (json.loads((tmp_path / f"m{k}.json").read_text()) for k in (2, 3))
    assert m2["models"]["global"]["r2"] == m3["models"]["global"]["r2"]
    assert main(["predict", str(tmp_path / "m2"), str(v2), "--out", str(tmp_path / "p.zarr")] + common) == 0
    assert main(["audit", str(v2), "--out", str(tmp_path / "a")] + common) == 0
    assert main(["ceiling", str(v2), "--out", str(tmp_path / "c")] + common) == 0
