"""Faults a cluster really has: dead workers, corrupt stores, bad values, and determinism."""

from __future__ import annotations

import json
import os
import shutil
import time

import dask
import numpy as np
import pytest
from conftest import clean_arrays, fit_cfg, small_sim_config, train_cells, write_raw, write_sim

from snrmoe_dask.catalog import CatalogError, open_catalog
from snrmoe_dask.cli import main
from snrmoe_dask.fit import fit_model
from snrmoe_dask.reduce import one_pass
from snrmoe_dask.split import TRAIN
from snrmoe_dask.store import load_model


@pytest.fixture(scope="module")
def kill_catalog(tmp_path_factory):
    return write_sim(tmp_path_factory.mktemp("wk") / "cat.zarr",
                     small_sim_config(n=6000, n_pixels=512, chunk_size=100, seed=9))


@pytest.mark.slow
def test_killing_a_worker_mid_reduction_gives_identical_statistics(kill_catalog):
    from distributed import Client, LocalCluster

    ds = open_catalog(kill_catalog)
    cells = train_cells(ds)

    def graph():
        stats, _, bstats, _ = one_pass(ds, ds["logg"].values, cells, n_cells=36, chains=2, flush_rows=64,
                                    precision="float64", baselines=("whitened", "conditional"))
        return stats, bstats

    with dask.config.set(scheduler="threads"):
        ref, ref_b = dask.compute(*graph())

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        futures = client.compute(list(graph()))

        def folds_done(dask_scheduler):
            return sum(1 for k, ts in dask_scheduler.tasks.items()
                       if str(k).startswith("acc-fold") and ts.state in ("memory", "released", "forgotten"))

        victim = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(f.done() for f in futures):
            if client.run_on_scheduler(folds_done) >= 6:
                holders = client.run_on_scheduler(
                    lambda dask_scheduler: sorted({ws.address for k, ts in dask_scheduler.tasks.items()
                                                   if str(k).startswith("acc-fold") and ts.state == "memory"
                                                   for ws in ts.who_has}))
                if holders:
                    victim = holders[0]
                    break
            time.sleep(0.02)
        assert victim is not None, "the pass finished before a worker could be killed"
        try:
            client.run(os._exit, 1, workers=[victim])  # the worker process dies without cleanup
        except Exception:  # noqa: BLE001 - the call itself fails: its worker is gone
            pass
        stats, bstats = client.gather(futures)
        assert victim not in client.scheduler_info()["workers"]  # it really died (the nanny started a new one)
    for name in ("n", "sx", "sy", "syy", "xtx", "xty"):
        np.testing.assert_array_equal(getattr(stats, name), getattr(ref, name), err_msg=name)
    np.testing.assert_array_equal(bstats.whitened.xtx, ref_b.whitened.xtx)
    np.testing.assert_array_equal(bstats.cross.sxz, ref_b.cross.sxz)


def test_corrupt_chunk_is_named_and_no_model_looks_complete(fit_catalog, tmp_path):
    cat = tmp_path / "cat.zarr"
    shutil.copytree(fit_catalog, cat)
    chunk = cat / "flux" / "c" / "3" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])  # truncated
    with dask.config.set(scheduler="threads"), pytest.raises(CatalogError, match=r"'flux' chunk 3 .*rows 768-1024"):
        fit_model(cat, tmp_path / "m", fit_cfg(), progress=False)
    assert not (tmp_path / "m" / "model.json").exists()
    with pytest.raises(Exception, match="no model.json"):
        load_model(tmp_path / "m")
    # through the CLI: one line naming the chunk, exit 2
    assert main(["fit", str(cat), "--out", str(tmp_path / "m2"), "--scheduler", "threads"]) == 2


def test_missing_chunk_file_is_named(fit_catalog, tmp_path):
    cat = tmp_path / "cat.zarr"
    shutil.copytree(fit_catalog, cat)
    (cat / "error" / "c" / "5" / "0").unlink()
    with dask.config.set(scheduler="threads"), pytest.raises(CatalogError, match=r"'error' chunk file\(s\) \[5\]"):
        fit_model(cat, tmp_path / "m", fit_cfg(), progress=False)


def test_bad_values_are_counted_and_the_fit_matches_a_clean_run(tmp_path):
    n, p = 1200, 48
    flux, error, labels = clean_arrays(n=n, p=p, seed=4)
    rng = np.random.default_rng(1)
    labels["snr"] = rng.uniform(1, 9, n)
    labels["logg"] = flux[:, :5].astype(np.float64) @ rng.normal(size=5) / 50 + rng.normal(0, 0.1, n)
    ids = np.arange(n, dtype=np.int64) * 7 + 3
    bad = {"nan_flux": np.arange(0, 40), "inf_flux": np.arange(40, 60), "zero_error": np.arange(60, 90),
           "negative_error": np.arange(90, 100), "masked": np.arange(100, 130)}
    mask = np.zeros((n, p), bool)
    f, e = flux.copy(), error.copy()
    f[bad["nan_flux"]] = np.nan
    f[bad["inf_flux"]] = np.inf
    e[bad["zero_error"]] = 0.0
    e[bad["negative_error"]] = -1.0
    mask[bad["masked"]] = True
    edges = {"teff_edges": [4500.0, 5500.0], "mh_edges": [-1.5, -0.5]}  # fixed: the same cells in both fits
    dirty = write_raw(tmp_path / "dirty.zarr", f, e, ids=ids, mask=mask, chunk=128, **labels)
    all_bad = np.concatenate(list(bad.values()))
    keep = np.setdiff1d(np.arange(n), all_bad)
    clean = write_raw(tmp_path / "clean.zarr", flux[keep], error[keep], ids=ids[keep], mask=mask[keep], chunk=128,
                      **{k: v[keep] for k, v in labels.items()})
    cfg = fit_cfg(precision="float64", baselines=[])
    cfg = cfg.model_copy(update={"catalog": cfg.catalog.model_copy(update=edges)})
    with dask.config.set(scheduler="threads"):
        m_dirty = fit_model(dirty, tmp_path / "md", cfg, progress=False)
        m_clean = fit_model(clean, tmp_path / "mc", cfg, progress=False)
    ds = open_catalog(dirty, config=cfg.catalog)
    train_bad = int((ds["split"].values[all_bad] == TRAIN).sum())
    assert m_dirty.meta["train_rows_excluded_unusable"] == train_bad > 0
    assert m_dirty.meta["train_rows"] - train_bad == m_clean.meta["train_rows"]
    g = m_dirty.index["global"]
    np.testing.assert_allclose(m_dirty.experts["coef"].values[g], m_clean.experts["coef"].values[g], rtol=1e-9,
                               atol=1e-12)
    np.testing.assert_allclose(m_dirty.experts["intercept"].values[g], m_clean.experts["intercept"].values[g],
                               rtol=1e-9)
    # every bad pixel is counted by reason in the feature table, and each bad row is flagged unusable
    import xarray as xr

    feats = xr.open_zarr(tmp_path / "md" / "features.zarr", consolidated=False).load()
    assert int(feats["n_bad_flux"].sum()) == (len(bad["nan_flux"]) + len(bad["inf_flux"])) * p
    assert int(feats["n_bad_error"].sum()) == (len(bad["zero_error"]) + len(bad["negative_error"])) * p
    assert int(feats["n_masked"].sum()) == len(bad["masked"]) * p
    assert not feats["usable"].values[all_bad].any() and feats["usable"].values[keep].all()


def test_same_seed_gives_bit_identical_metrics(tmp_path):
    from snrmoe_dask.config import load_config
    from snrmoe_dask.pipeline import run_pipeline

    def run(out):
        cfg = load_config(overrides={"simulate": small_sim_config(n=1200, n_pixels=64, chunk_size=300).model_dump(),
                                     "catalog": {"test_size": 200}, "fit": {"min_cell_rows": 10},
                                     "cluster": {"scheduler": "threads"},
                                     "run": {"out": str(out), "audit": False, "report": False}})
        run_pipeline(cfg)
        return json.loads((out / "metrics.json").read_text())

    a, b = run(tmp_path / "a"), run(tmp_path / "b")
    a.pop("catalog"), b.pop("catalog"), a.pop("ceiling_seconds", None), b.pop("ceiling_seconds", None)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_model_store_holds_no_pickle(fitted):
    """Every file is JSON or a zarr array of plain numbers (no object dtype, no pickle codec)."""
    _, _, model_dir = fitted
    arrays = 0
    for path in model_dir.rglob("*"):
        assert path.suffix not in (".pkl", ".pickle", ".joblib", ".npy"), path
        if path.name == "zarr.json":
            meta = json.loads(path.read_text())
            if meta.get("node_type") == "array":
                arrays += 1
                assert meta["data_type"] in ("bool", "int8", "int16", "int32", "int64", "uint8", "float32",
                                             "float64"), (path, meta["data_type"])
                assert "pickle" not in json.dumps(meta.get("codecs", [])).lower(), path
        elif path.suffix == ".json":
            json.loads(path.read_text())
    assert arrays > 20
    model = load_model(model_dir)
    assert model.gates and model.baselines is not None


def test_tampered_expert_store_fails_validation(fitted, tmp_path):
    from snrmoe_dask.store import ModelError

    _, _, model_dir = fitted
    copy = tmp_path / "m"
    shutil.copytree(model_dir, copy)
    meta = json.loads((copy / "model.json").read_text())
    meta["n_pixels"] += 1
    (copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="pixels"):
        load_model(copy)
