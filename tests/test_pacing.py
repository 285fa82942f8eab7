"""Reads paced by the accumulator chain: bounded blocks in memory, same results."""

from __future__ import annotations

import time

import dask
import numpy as np
from conftest import train_cells
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
        self.read, self.folded, self.max_pile = set(), set(), 0

    def _posttask(self, key, result, dsk, state, worker_id):
        name = key if isinstance(key, str) else str(key)
        i = name.rsplit("-", 1)[-1]
        if name.startswith("read-flux-"):
            self.read.add(i)
        elif name.startswith("acc-fold-"):
            self.folded.add(i)
            time.sleep(0.02)  # a chain slower than the reads, as on real data
        self.max_pile = max(self.max_pile, len(self.read - self.folded))


def test_reads_never_run_more_than_read_ahead_chunks_before_the_chain(sim_catalog):
    ds = open_catalog(sim_catalog, chunk_size=None)
    cells = train_cells(ds)
    n_chunks = len(ds["flux"].chunks[0])
    assert n_chunks >= 4
    stats, feats, _ = one_pass(ds, ds["logg"].values, cells, n_cells=36, chains=1, flush_rows=64,
                               precision="float64", read_ahead=1)
    pile = _Pile()
    with dask.config.set(scheduler="threads", num_workers=4), pile:
        paced, paced_feats = dask.compute(stats, feats)
    assert len(pile.read) == n_chunks
    assert pile.max_pile <= 2  # the chunk being folded + read_ahead

    # the unpaced path (a rechunked catalog reads through its dask blocks) gives the same sums
    other = ds.chunk({"spectrum": 100})
    assert array_source(other["flux"].data) is None
    stats2, feats2, _ = one_pass(other, ds["logg"].values, cells, n_cells=36, chains=1, flush_rows=64,
                                 precision="float64")
    with dask.config.set(scheduler="threads"):
        unpaced, unpaced_feats = dask.compute(stats2, feats2)
    np.testing.assert_array_equal(paced.n, unpaced.n)
    for k in np.flatnonzero(paced.n):  # centred sums: the shifts differ with the first chunk
        a, b = paced.cells([k]), unpaced.cells([k])
        np.testing.assert_allclose(a.gram, b.gram, rtol=1e-9, atol=1e-9 * np.abs(a.gram).max())
        np.testing.assert_allclose(a.xty, b.xty, rtol=1e-9, atol=1e-9 * np.abs(a.xty).max())
    np.testing.assert_array_equal(np.concatenate(paced_feats), np.concatenate(unpaced_feats))
