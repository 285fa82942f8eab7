"""The folds' per-row inputs read from a small store: the same inputs, a graph that does not grow with N."""

from __future__ import annotations

import cloudpickle
import dask
import numpy as np
import pytest
from conftest import small_sim_config, train_cells, write_sim
from dask.highlevelgraph import HighLevelGraph

from snrmoe_dask.catalog import open_catalog
from snrmoe_dask.config import Config
from snrmoe_dask.foldinputs import fold_inputs, read_fold_inputs
from snrmoe_dask.leakage import audit_plan
from snrmoe_dask.reduce import one_pass


def _cfg() -> Config:
    return Config.model_validate({"catalog": {"test_size": 20}})


def test_inputs_read_from_the_store_equal_the_embedded_ones(tmp_path, sim_catalog):
    ds = open_catalog(sim_catalog)
    plan = audit_plan(ds, _cfg())
    assert 0 < plan.rows < ds.sizes["spectrum"]
    y, cell = ds["logg"].values, train_cells(ds)
    starts = np.r_[0, np.cumsum(ds["flux"].chunks[0])]
    embedded = fold_inputs(y, cell, plan, starts, None, "t")
    lazy = fold_inputs(y, cell, plan, starts, tmp_path / "inputs.zarr", "t")
    assert all(dask.is_dask_collection(x) for x in lazy)  # reads, not data
    (read,) = dask.compute(lazy, scheduler="synchronous")
    assert len(read) == len(embedded) == len(starts) - 1
    for (y0, c0, a0), (y1, c1, a1) in zip(embedded, read):
        np.testing.assert_array_equal(y1, y0)
        np.testing.assert_array_equal(c1, c0)
        assert c1.dtype == np.int64
        assert (a0 is None) == (a1 is None)
        if a0 is not None:
            for u, v in zip(a0, a1):
                np.testing.assert_array_equal(v, u)
                assert v.dtype == u.dtype


def test_the_pass_reads_its_inputs_and_sums_the_same(tmp_path, sim_catalog):
    ds = open_catalog(sim_catalog)
    plan = audit_plan(ds, _cfg())
    y, cell = ds["logg"].values, train_cells(ds)
    out = {}
    for name, store in (("embedded", None), ("store", tmp_path / "inputs.zarr")):
        g = one_pass(ds, y, cell, n_cells=36, chains=2, flush_rows=64, precision="float64",
                     baselines=("whitened", "conditional"), audit=plan, inputs_store=store)
        out[name] = dask.compute(g.stats, g.baselines, g.audit, scheduler="threads")
    (s0, b0, a0), (s1, b1, a1) = out["embedded"], out["store"]
    for k in ("n", "sx", "sy", "syy", "xtx", "xty"):
        np.testing.assert_array_equal(getattr(s1, k), getattr(s0, k))
        np.testing.assert_array_equal(getattr(b1.whitened, k), getattr(b0.whitened, k))
        np.testing.assert_array_equal(getattr(a1.big["full"], k), getattr(a0.big["full"], k))
    np.testing.assert_array_equal(a1.rows, a0.rows)


def _graph_bytes(ds, store) -> int:
    plan = audit_plan(ds, _cfg())
    g = one_pass(ds, ds["logg"].values, train_cells(ds), n_cells=36, chains=1, audit=plan,
                 baselines=("whitened", "conditional"), inputs_store=store)
    graph = HighLevelGraph.merge(*(x.__dask_graph__() for x in (g.stats, g.audit, *g.features)))
    return len(cloudpickle.dumps(dict(graph)))


def test_the_pass_graph_does_not_grow_with_the_rows(tmp_path):
    """Same chunks, 8 x the rows: with the store the graph keeps its size; embedded, it grows by the rows'
    targets, cells and audit rows."""
    small = open_catalog(write_sim(tmp_path / "s.zarr", small_sim_config(n=400, chunk_size=50, n_pixels=64)))
    large = open_catalog(write_sim(tmp_path / "l.zarr", small_sim_config(n=3200, chunk_size=400, n_pixels=64)))
    assert len(small["flux"].chunks[0]) == len(large["flux"].chunks[0]) == 8
    with_store = {k: _graph_bytes(d, tmp_path / f"{k}.zarr") for k, d in (("s", small), ("l", large))}
    embedded = {k: _graph_bytes(d, None) for k, d in (("s", small), ("l", large))}
    grown = 2800 * (8 + 8)  # at least y and cell of the 2,800 more rows, embedded
    assert embedded["l"] - embedded["s"] > grown
    # what grows with the store: only the first chunk's rows for the shifts (350 rows more)
    assert with_store["l"] - with_store["s"] < grown / 4


def test_a_worker_without_the_store_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="filesystem every worker sees"):
        read_fold_inputs(str(tmp_path / "elsewhere.zarr"), 0, 10, 0, 0)
