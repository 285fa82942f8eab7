"""The study reads each chunk of the catalog's cube once: fit (pass + gates) and evaluate, counted at the store."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import dask
import numpy as np
import pytest
import xarray as xr
from conftest import fit_cfg
from zarr.storage import LocalStore

from snrmoe_dask.cache import CACHE_DIR, open_row_cache
from snrmoe_dask.catalog import open_catalog
from snrmoe_dask.evaluate import evaluate_model
from snrmoe_dask.fit import fit_model
from snrmoe_dask.store import load_model


@pytest.fixture
def counted_reads(monkeypatch):
    """Every ``get`` of a chunk from any local zarr store, by full path (stores may be opened at a group or
    straight at an array)."""
    counts: Counter = Counter()
    original = LocalStore.get

    async def get(self, key, prototype=None, byte_range=None):
        full = f"{self.root}/{key}"
        if "/c/" in full:
            counts[full] += 1
        return await original(self, key, prototype, byte_range)

    monkeypatch.setattr(LocalStore, "get", get)
    return counts


def test_fit_audit_and_evaluate_read_every_cube_chunk_of_the_catalog_once(fit_catalog, tmp_path, counted_reads):
    cfg = fit_cfg()
    with dask.config.set(scheduler="threads"):  # in-process, so the patched store sees every read
        fit_model(fit_catalog, tmp_path / "m", cfg, progress=False, audit_out=tmp_path / "audit")
    audit = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert audit["rows"]["test"] == int(open_catalog(fit_catalog, config=cfg.catalog)["frozen_test"].values.sum())
    assert audit["representations"]["full"]["snr_r2_se"] > 0
    model = load_model(tmp_path / "m")
    with dask.config.set(scheduler="threads"):
        evaluate_model(model, fit_catalog, cfg, progress=False)
    ds = open_catalog(fit_catalog, config=cfg.catalog)
    n_chunks = len(ds["flux"].chunks[0])
    cube = {k: v for k, v in counted_reads.items()
            if k.startswith(f"{fit_catalog}/") and k[len(str(fit_catalog)) + 1:].split("/")[0] in ("flux", "error")}
    per_var = Counter(k[len(str(fit_catalog)) + 1:].split("/")[0] for k in cube)
    assert per_var["flux"] == per_var["error"] == n_chunks  # every chunk once (and no mask in this catalog)
    assert max(cube.values()) == 1
    # the roles are read apart: the gate stage reads the val parts once, the audit and evaluate only the
    # frozen-test parts (once each), so no stage reads rows it does not use
    rows_dir = f"{tmp_path / 'm' / CACHE_DIR}/"
    by_role = Counter()
    for key, count in counted_reads.items():
        if key.startswith(rows_dir) and key[len(rows_dir):].split("/")[1] in ("flux", "error"):
            part = key[len(rows_dir):].split("/")[0]
            by_role[(part.split("-")[0], count)] += 1
    assert {role for role, _ in by_role} == {"part", "test"}
    assert all(count == (2 if role == "test" else 1) for role, count in by_role), by_role
    # the gates and evaluate read the rows the pass cached, and they are the catalog's rows, bit for bit
    cache = open_row_cache(tmp_path / "m" / CACHE_DIR, ds)
    assert cache is not None and model.meta["gates"]["val_rows_source"] == "row cache"
    pos = cache["position"].values
    expect = np.flatnonzero((ds["split"].values == 1) | ds["frozen_test"].values)
    np.testing.assert_array_equal(pos, expect)
    np.testing.assert_array_equal(cache["flux"].values, ds["flux"].values[pos])
    np.testing.assert_array_equal(cache["logg"].values, ds["logg"].values[pos])
    np.testing.assert_array_equal(cache["spectrum"].values, ds["spectrum"].values[pos])


def test_evaluate_from_the_cache_equals_evaluate_from_the_catalog(fit_catalog, fitted, tmp_path):
    """The same metrics whether the frozen-test rows come from the cache or (cache removed) from the catalog."""
    import shutil

    _, cfg, model_dir = fitted
    a = evaluate_model(load_model(model_dir), fit_catalog, cfg, progress=False)
    copy = tmp_path / "m"
    shutil.copytree(model_dir, copy)
    shutil.rmtree(copy / CACHE_DIR)
    b = evaluate_model(load_model(copy), fit_catalog, cfg, progress=False)
    assert a["test_rows_source"] == "row cache" and b["test_rows_source"] == "catalog"
    for name in a["models"]:  # the same rows in other blocks: sums may differ in the last bit, no more
        np.testing.assert_allclose(a["models"][name]["r2"], b["models"][name]["r2"], rtol=1e-12, err_msg=name)


def _small_catalog(n: int, p: int, seed: int):
    """An in-memory catalog-shaped Dataset of n val rows (what the row cache is written from)."""
    import xarray as xr

    rng = np.random.default_rng(seed)
    return xr.Dataset({"flux": (("spectrum", "wavelength"), rng.normal(size=(n, p)).astype(np.float32)),
                       "error": (("spectrum", "wavelength"), np.ones((n, p), np.float32)),
                       "logg": ("spectrum", rng.uniform(0, 5, n)), "split": ("spectrum", np.ones(n, np.int8)),
                       "frozen_test": ("spectrum", np.zeros(n, bool))},
                      coords={"spectrum": np.arange(n), "wavelength": np.linspace(7000, 9000, p)})


def test_a_wide_cache_part_is_one_block_per_variable(tmp_path):
    """Parts of 4096-pixel rows: zarr's default would split the pixels, and the predictions need whole rows."""
    import xarray as xr

    from snrmoe_dask.cache import cached_rows, plan_row_cache, write_part

    n, p = 300, 4096
    ds = _small_catalog(n, p, 0)
    keep = cached_rows(ds, None, 0)
    ((part,),) = plan_row_cache(ds, keep, tmp_path / "rows", np.array([0, n]), {})
    write_part(part, ds["flux"].values, ds["error"].values, None)
    cache = open_row_cache(tmp_path / "rows", ds)
    assert cache["flux"].data.numblocks == (1, 1)
    stored = xr.open_zarr(part.path, consolidated=False)["flux"].encoding["chunks"]
    assert tuple(stored) == (n, p)
    np.testing.assert_array_equal(cache["flux"].values, ds["flux"].values)


def test_cache_parts_open_from_their_recorded_rows_in_chunk_order_and_older_caches_still_open(tmp_path):
    """cache.json records each part's rows, so opening reads no part's metadata; parts come back in catalog
    chunk order even past 5-digit names (part-100000 sorts before part-10001 as text); a cache written
    before ``part_rows`` existed opens the same from the parts' own metadata."""
    from snrmoe_dask.cache import cached_rows, plan_row_cache, write_part

    n, p = 90, 16
    rng = np.random.default_rng(1)
    ds = _small_catalog(n, p, 1)
    keep = cached_rows(ds, None, 0) & (rng.random(n) < 0.7)
    starts = np.array([0, 20, 50, 90])
    root = tmp_path / "rows"
    parts = [part for (part,) in plan_row_cache(ds, keep, root, starts, {})]  # val rows only: one part per chunk
    for part, lo in zip(parts, starts):
        write_part(part, ds["flux"].values[lo:], ds["error"].values[lo:], None)
    # rename the parts as chunks 9999, 10000 and 100000 would be named
    for part, i in zip(parts, (9_999, 10_000, 100_000)):
        Path(part.path).rename(root / f"part-{i:05d}.zarr")
    info = json.loads((root / "cache.json").read_text())
    assert info["part_rows"] == [int(keep[a:b].sum()) for a, b in zip(starts[:-1], starts[1:])]
    cache = open_row_cache(root, ds)
    np.testing.assert_array_equal(cache["flux"].values, ds["flux"].values[keep])
    (root / "part-notes.zarr").mkdir()  # a name that is not a part is not one (and breaks nothing)
    np.testing.assert_array_equal(open_row_cache(root, ds)["flux"].values, ds["flux"].values[keep])
    r = info["part_rows"]  # one row moved between parts: the total still matches, the parts do not
    bad = {**info, "part_rows": [r[0] + 1, r[1] - 1, *r[2:]]}
    (root / "cache.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="row cache part .* holds .* rows, cache.json says"):
        open_row_cache(root, ds)["flux"].compute()
    del info["part_rows"]
    (root / "cache.json").write_text(json.dumps(info))
    np.testing.assert_array_equal(open_row_cache(root, ds)["flux"].values, ds["flux"].values[keep])


def test_a_damaged_or_foreign_rows_directory_is_neither_trusted_nor_deleted(tmp_path):
    from snrmoe_dask.cache import remove_row_cache

    rows = tmp_path / "rows"
    rows.mkdir()
    (rows / "notes.txt").write_text("the user's own file")
    (rows / "cache.json").write_text("{not json")
    assert open_row_cache(rows) is None  # unreadable: the stages read the catalog instead
    remove_row_cache(rows)
    assert (rows / "notes.txt").read_text() == "the user's own file"  # not ours: left alone
    (rows / "cache.json").write_text('{"kind": "snrmoe.row_cache", "parts": 0, "catalog_fingerprint": "x"}')
    remove_row_cache(rows)
    assert not rows.exists()


def test_a_catalog_without_snr_is_routed_by_the_estimate_in_the_same_read(tmp_path, counted_reads):
    """No features-first pass: the fold routes each train row by its S/N estimate, as the feature table says."""
    import xarray as xr
    from conftest import write_raw

    from snrmoe_dask.bins import phys_bin, snr_bin

    rng = np.random.default_rng(3)
    n, p = 1500, 48
    error = rng.uniform(0.5, 4.0, (n, 1)) * rng.uniform(0.9, 1.1, (n, p))
    flux = 50 + rng.normal(size=(n, p)) * error
    path = write_raw(tmp_path / "nosnr.zarr", flux, error, chunk=300, logg=rng.uniform(0, 5, n),
                     teff=rng.uniform(4000, 7000, n), mh=rng.uniform(-2, 0.5, n))
    cfg = fit_cfg()
    with dask.config.set(scheduler="threads"):
        model = fit_model(path, tmp_path / "m", cfg, progress=False)
    assert model.meta["snr_routing_source"].startswith("snr_est")
    cube = [k for k in counted_reads if k.startswith(f"{path}/flux/") or k.startswith(f"{path}/error/")]
    assert max(counted_reads[k] for k in cube) == 1 and len(cube) == 2 * 5
    feats = xr.open_zarr(tmp_path / "m" / "features.zarr", consolidated=False).load()
    ds = open_catalog(path, config=cfg.catalog)
    e = model.edges
    cells = (phys_bin(ds["teff"].values, ds["mh"].values, e["teff_edges"], e["mh_edges"]).astype(int)
             * len(model.snr_names) + snr_bin(feats["snr_est"].values, e["snr_edges"]))
    train = (ds["split"].values == 0) & feats["usable"].values
    expect = np.bincount(cells[train], minlength=len(model.meta["rows_per_cell"]))
    np.testing.assert_array_equal(model.meta["rows_per_cell"], expect)


def test_building_the_pass_reads_nothing(fit_catalog, counted_reads):
    """The graph is lazy: planning the pass (and its cache and audit) touches no chunk of the cube."""
    from snrmoe_dask.leakage import audit_plan
    from snrmoe_dask.reduce import one_pass

    cfg = fit_cfg()
    ds = open_catalog(fit_catalog, config=cfg.catalog)
    n = ds.sizes["spectrum"]
    before = sum(v for k, v in counted_reads.items() if "/flux/" in k or "/error/" in k)
    graph = one_pass(ds, ds["logg"].values, np.where(ds["split"].values == 0, 0, -1), n_cells=1,
                     audit=audit_plan(ds, cfg), chains=2)
    assert len(graph.features) == len(ds["flux"].chunks[0]) and n > 0
    assert sum(v for k, v in counted_reads.items() if "/flux/" in k or "/error/" in k) == before


def test_the_cache_keeps_test_and_val_rows_apart_and_opens_each_role_or_the_union_in_catalog_order(tmp_path,
                                                                                                  monkeypatch):
    """Each chunk's frozen-test rows and its val rows go to separate parts; ``role`` opens one role, ``None``
    all of them by position; a version-2 cache (both roles in one part per chunk) still opens, either way."""
    from snrmoe_dask.cache import cached_rows, plan_row_cache, write_part

    n, p = 120, 8
    rng = np.random.default_rng(3)
    ds = _small_catalog(n, p, 3)
    ds["split"] = ("spectrum", rng.choice(np.array([0, 1, 2], np.int8), n))
    ds["frozen_test"] = ("spectrum", (ds["split"].values == 2) & (rng.random(n) < 0.6))
    keep = cached_rows(ds, None, 0)
    starts = np.array([0, 40, 80, 120])
    root = tmp_path / "rows"
    parts = plan_row_cache(ds, keep, root, starts, {})
    assert all(len(chunk) == 2 for chunk in parts)
    for chunk, lo in zip(parts, starts):
        for part in chunk:
            write_part(part, ds["flux"].values[lo:], ds["error"].values[lo:], None)
    test, val = ds["frozen_test"].values, keep & ~ds["frozen_test"].values
    for role, rows in (("test", test), ("val", val), (None, keep)):
        cache = open_row_cache(root, ds, role=role)
        np.testing.assert_array_equal(cache["position"].values, np.flatnonzero(rows), err_msg=str(role))
        np.testing.assert_array_equal(cache["flux"].values, ds["flux"].values[rows], err_msg=str(role))
        np.testing.assert_array_equal(cache["logg"].values, ds["logg"].values[rows], err_msg=str(role))
    assert open_row_cache(root, ds, role="test")["flux"].data.numblocks[0] == 1  # small parts: one block
    with pytest.raises(ValueError, match="role must be one of"):
        open_row_cache(root, ds, role="train")
    import snrmoe_dask.cache as cache_module
    val_rows = json.loads((root / "cache.json").read_text())["part_rows"]
    limit = val_rows[0] + val_rows[1]  # the first two val parts fit one block, the third does not join them
    monkeypatch.setattr(cache_module, "BLOCK_ROWS", limit)
    grouped = open_row_cache(root, ds, role="val")
    assert grouped["flux"].data.chunks[0] == (limit, val_rows[2])
    np.testing.assert_array_equal(grouped["flux"].values, ds["flux"].values[val])
    monkeypatch.undo()

    # version 2: one part per chunk with both roles (what earlier fits wrote)
    old = tmp_path / "old"
    old_parts = plan_row_cache(ds.assign(frozen_test=("spectrum", np.zeros(n, bool))), keep, old, starts, {})
    for (part,), lo in zip(old_parts, starts):
        write_part(part, ds["flux"].values[lo:], ds["error"].values[lo:], None)
    info = json.loads((old / "cache.json").read_text())
    info.update(version=2, catalog_fingerprint=json.loads((root / "cache.json").read_text())["catalog_fingerprint"])
    (old / "cache.json").write_text(json.dumps(info))
    import shutil
    shutil.rmtree(old / "columns.zarr")
    shutil.copytree(root / "columns.zarr", old / "columns.zarr")  # the real frozen_test column
    for role, rows in (("test", test), ("val", val), (None, keep)):
        cache = open_row_cache(old, ds, role=role)
        np.testing.assert_array_equal(cache["flux"].values, ds["flux"].values[rows], err_msg=f"v2 {role}")


def test_the_audit_scored_on_a_cluster_beside_the_gates_equals_the_audit_scored_in_process(fit_catalog, tmp_path):
    """With a client the audit's scoring is a task that overlaps the gate fits: same audit, same model."""
    from dask.utils import key_split
    from distributed import get_task_stream

    from snrmoe_dask.cluster import dask_session
    from snrmoe_dask.config import ClusterConfig

    cfg = fit_cfg()
    with dask.config.set(scheduler="threads"):
        fit_model(fit_catalog, tmp_path / "here", cfg, progress=False, audit_out=tmp_path / "audit-here")
    with dask_session(ClusterConfig(processes=False, dashboard_address="127.0.0.1:0", threads_per_worker=2),
                      quiet=True) as client:
        with get_task_stream(client) as stream:
            fit_model(fit_catalog, tmp_path / "there", cfg, client=client, progress=False,
                      audit_out=tmp_path / "audit-there")
        # the gate table's projections are on the gate stage's critical path: the scoring starts after them
        starts = {}
        for rec in stream.data:
            name = key_split(rec["key"])
            start = min(s["start"] for s in rec["startstops"] if s["action"] == "compute")
            starts.setdefault(name, []).append(start)
        assert min(starts["audit scoring"]) > max(starts["experts-predict"])
        left = None
        for _ in range(100):  # releasing is a message to the scheduler: let it arrive
            left = list(client.who_has())
            if not left:
                break
            time.sleep(0.1)
        assert not left  # nothing stays on the cluster: the audit's scoring, its inputs (test rows) included
    here = json.loads((tmp_path / "audit-here" / "audit.json").read_text())
    there = json.loads((tmp_path / "audit-there" / "audit.json").read_text())
    assert here["rows"] == there["rows"] and here["rows"]["test"] > 0
    assert here["representations"] == there["representations"]
    assert here["checks"] == there["checks"]
    a = json.loads((tmp_path / "here" / "model.json").read_text())
    b = json.loads((tmp_path / "there" / "model.json").read_text())
    assert "audit_s" in b["timings"] and b["timings"]["audit_s"] > 0
    xa = xr.open_zarr(tmp_path / "here" / "experts.zarr", consolidated=False).load()
    xb = xr.open_zarr(tmp_path / "there" / "experts.zarr", consolidated=False).load()
    np.testing.assert_array_equal(xa["coef"].values, xb["coef"].values)
    assert a["gates"]["default"] == b["gates"]["default"] and a["gates"]["fitted"] == b["gates"]["fitted"]
