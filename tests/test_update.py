"""Updating and merging models from their statistics equals a fit on the catalogs joined."""

from __future__ import annotations

import json
import shutil

import dask
import numpy as np
import pytest
import xarray as xr
from conftest import fit_cfg, small_sim_config, write_sim

from snrmoe_dask.evaluate import evaluate_model
from snrmoe_dask.fit import fit_model
from snrmoe_dask.store import load_model
from snrmoe_dask.update import merge_models, update_model

SPLIT_AT = 2560  # A: the first 10 chunks of 256 rows, B: the rest


def _write(ds: xr.Dataset, path):
    ds = ds.copy()
    for var in ds.variables.values():
        var.encoding.clear()
    ds.chunk({"spectrum": 256}).to_zarr(path, mode="w-", zarr_format=3, consolidated=False)
    return path


@pytest.fixture(scope="module")
def catalogs(tmp_path_factory):
    """A 4,000 x 96 catalog, and its first 2,560 and last 1,440 rows as two catalogs A and B."""
    root = tmp_path_factory.mktemp("upd")
    full = write_sim(root / "full.zarr", small_sim_config(n=4000, n_pixels=96, chunk_size=256, seed=21))
    ds = xr.open_zarr(full, consolidated=False).load()
    return full, _write(ds.isel(spectrum=slice(0, SPLIT_AT)), root / "a.zarr"), \
        _write(ds.isel(spectrum=slice(SPLIT_AT, None)), root / "b.zarr")


def _hashes(root):
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _cfg(edges=None):
    cfg = fit_cfg(precision="float64")
    if edges:
        cfg = cfg.model_copy(update={"catalog": cfg.catalog.model_copy(
            update={"teff_edges": edges["teff_edges"], "mh_edges": edges["mh_edges"]})})
    return cfg


def _fit(cat, out, cfg):
    with dask.config.set(scheduler="threads"):
        return fit_model(cat, out, cfg, progress=False)


def _assert_same_model(got, want, full, tmp_path):
    assert got.meta["bin_edges"] == want.meta["bin_edges"]
    assert got.meta["rows_per_cell"] == want.meta["rows_per_cell"]
    assert got.meta["train_rows"] == want.meta["train_rows"]
    for name in ("coef", "intercept", "resid_var", "pca_mean", "pca_components"):
        np.testing.assert_allclose(got.experts[name].values, want.experts[name].values, rtol=1e-8, atol=1e-12,
                                   err_msg=name)
    # the same point of the α grid (the grid scales with the statistics' trace: equal to its last bits)
    np.testing.assert_allclose(got.experts["alpha"].values, want.experts["alpha"].values, rtol=1e-12)
    for name in ("coef", "intercept"):
        np.testing.assert_allclose(got.baselines[name].values, want.baselines[name].values, rtol=1e-8, atol=1e-12)
    assert got.meta["gates"]["val_rows"] == want.meta["gates"]["val_rows"] and set(got.gates) == set(want.gates)
    # the gates are fitted on the same table (the val rows of both catalogs, projected on experts equal to 1e-8)
    tables = [xr.open_zarr(m.path / "gate_table.zarr", consolidated=False).load() for m in (got, want)]
    np.testing.assert_array_equal(tables[0]["spectrum"].values, tables[1]["spectrum"].values)
    for name in ("expert_pred", "physical", "quality", "y", "select", "gate_fit"):
        np.testing.assert_allclose(tables[0][name].values, tables[1][name].values, rtol=1e-9, atol=1e-12,
                                   err_msg=name)
    with dask.config.set(scheduler="threads"):
        m_got = evaluate_model(got, full, _cfg(), progress=False)
        m_want = evaluate_model(want, full, _cfg(), progress=False)
    assert m_got["n_test"] == m_want["n_test"] > 0
    fitted = want.meta["gates"]["fitted"]
    for name, row in m_want["models"].items():
        opt = [fitted.get(name, {}).get("optimizer"), got.meta["gates"]["fitted"].get(name, {}).get("optimizer")]
        if opt[1] is None:  # experts, baselines, closed-form and scikit-learn gates: equal
            assert abs(m_got["models"][name]["r2"] - row["r2"]) < 1e-6, name
        elif all(o["converged"] for o in opt):  # an L-BFGS gate stops within its tolerance of the same minimum
            assert opt[0]["train_loss"] == pytest.approx(opt[1]["train_loss"], rel=1e-5), name
            assert abs(m_got["models"][name]["r2"] - row["r2"]) < 1e-4, name
        else:  # stopped at gates.max_iter: where it stops depends on the path, in both fits the same way
            assert not any(o["converged"] for o in opt) and opt[0]["iterations"] == opt[1]["iterations"], name

def test_update_equals_a_fit_on_both_catalogs_without_reading_the_first(catalogs, tmp_path):
    full, a, b = catalogs
    a_copy = tmp_path / "a.zarr"
    shutil.copytree(a, a_copy)
    model_a = _fit(a_copy, tmp_path / "ma", _cfg())
    edges = model_a.meta["bin_edges"]  # tertiles of A's training labels: the update keeps them
    want = _fit(full, tmp_path / "mu", _cfg(edges))
    shutil.rmtree(a_copy)  # the first catalog is gone: the update must not need it
    before = _hashes(tmp_path / "ma")
    with dask.config.set(scheduler="threads"):
        got = update_model(tmp_path / "ma", b, tmp_path / "mab", _cfg(), progress=False)
    _assert_same_model(got, want, full, tmp_path)
    assert _hashes(tmp_path / "ma") == before  # the old model is untouched, file by file
    load_model(tmp_path / "ma")
    meta = json.loads((tmp_path / "mab" / "model.json").read_text())
    assert [c["path"] for c in meta["catalogs"]] == [str(a_copy), str(b)]
    assert [c["rows"] for c in meta["catalogs"]] == [SPLIT_AT, 4000 - SPLIT_AT]
    assert [h["op"] for h in meta["history"]] == ["fit", "update"]
    assert "kept by update" in meta["bin_edges_source"]


def test_merge_equals_a_fit_on_both_catalogs_reading_neither(catalogs, tmp_path):
    full, a, b = catalogs
    model_a = _fit(a, tmp_path / "ma", _cfg())
    edges = model_a.meta["bin_edges"]
    _fit(b, tmp_path / "mb", _cfg(edges))
    want = _fit(full, tmp_path / "mu", _cfg(edges))
    with dask.config.set(scheduler="threads"):
        got = merge_models(tmp_path / "ma", tmp_path / "mb", tmp_path / "mab", _cfg(), progress=False)
    _assert_same_model(got, want, full, tmp_path)
    meta = json.loads((tmp_path / "mab" / "model.json").read_text())
    assert [c["rows"] for c in meta["catalogs"]] == [SPLIT_AT, 4000 - SPLIT_AT]
    assert [h["op"] for h in meta["history"]] == ["fit", "merge"]


def test_update_in_place_and_info_through_the_command_line(catalogs, tmp_path, capsys):
    from snrmoe_dask.cli import main

    _, a, b = catalogs
    model = tmp_path / "m"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("catalog: {test_size: 250}\nfit: {min_cell_rows: 10}\n")
    common = ["--config", str(cfg), "--scheduler", "threads"]
    assert main(["fit", str(a), "--out", str(model), *common]) == 0
    fitted_on_a = json.loads((model / "model.json").read_text())
    assert main(["update", str(model), str(b), "--out", str(model), "--in-place", *common]) == 0
    out = capsys.readouterr().out
    assert "of 2 catalog(s)" in out
    updated = json.loads((model / "model.json").read_text())
    assert updated["train_rows"] > fitted_on_a["train_rows"]
    assert [c["path"] for c in updated["catalogs"]] == [str(a), str(b)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "m"]  # no staging, old copy or lock left
    # the same catalog again: every id is known now
    assert main(["update", str(model), str(b), "--out", str(tmp_path / "again"), *common]) == 2
    assert f"{4000 - SPLIT_AT} spectrum ids are already in model" in capsys.readouterr().err
    assert main(["info", str(model)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("catalog 0") and str(a) in line for line in out)
    assert any(line.startswith("catalog 1") and str(b) in line for line in out)
    assert [line.split()[0] for line in out if line.split()[0] in ("fit", "update")] == ["fit", "update"]
    assert main(["evaluate", str(model), str(b), "--out", str(tmp_path / "e.json"), *common]) == 0


def test_an_update_takes_the_models_settings_and_only_the_run_settings_of_the_given_config(fitted):
    from snrmoe_dask.config import ConfigError, load_config
    from snrmoe_dask.prior import Prior
    from snrmoe_dask.update import model_config_for

    _, fit_cfg_used, model_dir = fitted
    prior = Prior.load(model_dir)
    given = load_config(overrides={"fit": {"memory_budget": "3GB", "read_ahead": 2}, "gates": {"n_jobs": 1},
                                   "cluster": {"scheduler": "threads"}})
    cfg = model_config_for(prior, given)
    assert cfg.fit.memory_budget == "3GB" and cfg.fit.read_ahead == 2 and cfg.gates.n_jobs == 1
    assert cfg.cluster.scheduler == "threads"
    assert cfg.catalog.test_size == fit_cfg_used.catalog.test_size == 250  # the model's, not the shipped 10,000
    assert cfg.fit.min_cell_rows == 10 and cfg.catalog.teff_edges == prior.edges["teff_edges"]
    with pytest.raises(ConfigError, match="fit.min_cell_rows is 7 in this config"):
        model_config_for(prior, load_config(overrides={"fit": {"min_cell_rows": 7}}))
