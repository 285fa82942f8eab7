"""Reads paced by the accumulator chain: bounded blocks in memory, same results."""

from __future__ import annotations

import time

import dask
import numpy as np
from conftest import small_sim_config, train_cells, write_sim
from dask.callbacks import Callback

from snrmoe_dask.catalog import _CheckedArray, open_catalog
from snrmoe_dask.pacing import array_source
from snrmoe_dask.reduce import one_pass


def test_array_source_is_the_checked_zarr_array_and_none_after_rechunk(sim_catalog):
    ds = open_catalog(sim_catalog)
    src = array_source(ds["flux"].data)
    assert isinstance(src, _CheckedArray)
    np.testing.assert_array_equal(np.asarray(src[128:256]), ds["flux"].values[128:256])
    assert array_source(ds.chunk({"spectrum": 100})["flux"].data) is None
    assert array_source(ds["flux"].data + 1) is None


class _Pile(Callback):
    """Tracks blocks read but not yet folded (the memory the pacing bounds)."""

    def __init__(self):
        super().__init__()
        self.read, self.folded, self.featured, self.max_pile, self.max_alive = set(), set(), set(), 0, 0

    def _posttask(self, key, result, dsk, state, worker_id):
        name = key if isinstance(key, str) else str(key)
        i = name.rsplit("-", 1)[-1]
        if name.startswith("read-flux-"):
            self.read.add(i)
        elif name.startswith("features-"):
            self.featured.add(i)
        elif name.startswith("acc-fold-"):
            self.folded.add(i)
            time.sleep(0.02)  # a chain slower than the reads, as on real data
        self.max_pile = max(self.max_pile, len(self.read - self.folded))
        # a block stays in memory until both its features task and its fold are done
        self.max_alive = max(self.max_alive, len(self.read - (self.folded & self.featured)))


def test_reads_never_run_more_than_read_ahead_chunks_before_the_chain(sim_catalog):
    ds = open_catalog(sim_catalog, chunk_size=None)
    cells = train_cells(ds)
    n_chunks = len(ds["flux"].chunks[0])
    assert n_chunks >= 4
    stats, feats, _, _ = one_pass(ds, ds["logg"].values, cells, n_cells=36, chains=1, flush_rows=64,
                               precision="float64", read_ahead=1)
    pile = _Pile()
    with dask.config.set(scheduler="threads", num_workers=4), pile:
        paced, paced_feats = dask.compute(stats, feats)
    assert len(pile.read) == n_chunks
    assert pile.max_pile <= 2  # the chunk being folded + read_ahead
    assert pile.max_alive <= 2  # features are not left behind holding blocks either

    # the unpaced path (a rechunked catalog reads through its dask blocks) gives the same sums
    other = ds.chunk({"spectrum": 100})
    assert array_source(other["flux"].data) is None
    stats2, feats2, _, _ = one_pass(other, ds["logg"].values, cells, n_cells=36, chains=1, flush_rows=64,
                                 precision="float64")
    with dask.config.set(scheduler="threads"):
        unpaced, unpaced_feats = dask.compute(stats2, feats2)
    np.testing.assert_array_equal(paced.n, unpaced.n)
    for k in np.flatnonzero(paced.n):  # centred sums: the shifts differ with the first chunk
        a, b = paced.cells([k]), unpaced.cells([k])
        np.testing.assert_allclose(a.gram, b.gram, rtol=1e-9, atol=1e-9 * np.abs(a.gram).max())
        np.testing.assert_allclose(a.xty, b.xty, rtol=1e-9, atol=1e-9 * np.abs(a.xty).max())
    np.testing.assert_array_equal(np.concatenate(paced_feats), np.concatenate(unpaced_feats))


def test_on_a_local_cluster_blocks_are_released_as_the_chain_folds(tmp_path, monkeypatch):
    """distributed's scheduler ran independent feature tasks late, keeping their blocks alive (grew with N)."""
    from distributed import Client, LocalCluster, get_task_stream

    import snrmoe_dask.reduce as reduce_mod

    fold = reduce_mod._fold

    def slow_fold(*args, **kw):  # the chain is the slow part at real scale (P = 4096)
        time.sleep(0.05)
        return fold(*args, **kw)

    monkeypatch.setattr(reduce_mod, "_fold", slow_fold)
    cat = write_sim(tmp_path / "many_chunks.zarr", small_sim_config(n=3000, n_pixels=96, chunk_size=50))
    ds = open_catalog(cat)
    assert len(ds["flux"].chunks[0]) == 60
    stats, feats, _, _ = one_pass(ds, ds["logg"].values, train_cells(ds), n_cells=36, chains=1, flush_rows=32,
                               precision="float64", read_ahead=2)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as client, get_task_stream(client) as ts:
        client.compute([stats, *feats], sync=True)
    done = {}
    for rec in ts.data:
        key = rec["key"] if isinstance(rec["key"], str) else str(rec["key"])
        done[key] = max(s["stop"] for s in rec["startstops"] if s["action"] == "compute")

    def ends(prefix):
        return {k.rsplit("-", 1)[1]: t for k, t in done.items() if k.startswith(prefix)}

    read, feat, fold = ends("read-flux-"), ends("features-"), ends("acc-fold-")
    assert len(read) == 60
    # a block lives from its read until both its features task and its fold have run
    events = sorted([(t, 1) for t in read.values()] + [(max(feat[i], fold[i]), -1) for i in read])
    alive = np.cumsum([d for _, d in events])
    assert alive.max() <= 2 + 2  # read_ahead + the chunk being folded + one being read


def test_read_ahead_below_one_is_refused(sim_catalog):
    import pytest

    ds = open_catalog(sim_catalog)
    with pytest.raises(ValueError, match="read_ahead must be at least 1"):
        one_pass(ds, ds["logg"].values, train_cells(ds), n_cells=36, read_ahead=0)


def test_thread_split_shares_the_cores_among_chains_and_never_zero():
    from snrmoe_dask.reduce import auto_chains, fold_blas_pieces

    assert fold_blas_pieces(2, 1) == 2  # this machine: the one chain's updates use both cores
    assert fold_blas_pieces(16, 1) == 16
    assert fold_blas_pieces(16, 4) == 4
    assert fold_blas_pieces(4, 8) == fold_blas_pieces(1, 1) == 1
    assert fold_blas_pieces(32, 1, threads_per_worker=4) == 4  # a fold runs on one worker's cores
    # chains are bounded by threads (one reads), chunks and memory (a 4096-pixel, 36-cell accumulator is ~3.1 GB)
    assert auto_chains(2, 489, 36, 4096, 1024, "float32", 64e9) == 1
    assert auto_chains(16, 489, 36, 4096, 1024, "float32", 8e9) == 2
    assert auto_chains(8, 489, 36, 4096, 1024, "float32", 64e9) == 7
    assert auto_chains(8, 8, 36, 4096, 1024, "float32", 64e9) == 2
