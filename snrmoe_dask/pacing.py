"""Chunk reads that cannot run far ahead of a serial accumulator chain.

A fold chain (``acc <- fold(acc, chunk i)``) is slower per chunk than reading
a chunk. With plain dask-array blocks the reads are independent root tasks,
so a thread that has nothing else to do keeps reading: the blocks pile up in
worker memory, waiting for the chain, and the pile grows with the number of
chunks (tens of GB at 1M spectra). :class:`PacedReads` makes the read of
chunk ``i`` depend on a tiny token of an earlier fold, so at most ``ahead``
chunks per chain are read but not yet folded, whatever N is.

The reads go straight to the array the catalog's dask array was built from
(``da.from_array``: the ``original-<name>`` graph node), so they read the same
rows through the same wrapper (:class:`~snrmoe_dask.catalog._CheckedArray`
names a corrupt chunk). A dask array of another origin (rechunked, sliced,
computed) is read through its own blocks, unpaced.
"""

from __future__ import annotations

from typing import Any

import dask
import numpy as np
import xarray as xr

__all__ = ["PacedReads", "array_source"]


def array_source(arr) -> Any | None:
    """The array-like a ``da.from_array`` dask array reads from, or ``None``."""
    graph = arr.__dask_graph__()
    layers = getattr(graph, "layers", None)
    key = f"original-{arr.name}"
    if layers is None or key not in graph:
        return None
    src = graph[key]
    src = getattr(src, "value", src)  # a DataNode in dask's task spec
    if not hasattr(src, "__getitem__") or getattr(src, "shape", None) != arr.shape:
        return None
    if len(arr.chunks) > 1 and any(len(c) > 1 for c in arr.chunks[1:]):
        return None  # only row blocks are read whole
    return src


def _read_rows(source, lo: int, hi: int, _after=None) -> np.ndarray:
    return np.asarray(source[lo:hi])


def _tick(_acc) -> int:
    return 0


class PacedReads:
    """Row-block reads of ``names`` (variables of ``ds``), paced by fold tokens.

    Parameters
    ----------
    ds : xarray.Dataset
        Dask-backed catalog.
    names : sequence of str
        Cube variables to read (missing ones read as ``None``).
    ahead : int
        Chunks a chain may read before it has folded them.
    token : str
        Distinguishes the task keys of different graphs.
    """

    def __init__(self, ds: xr.Dataset, names, ahead: int, token: str):
        if int(ahead) < 1:
            raise ValueError(f"read_ahead must be at least 1 chunk per chain, got {ahead}")
        self.names = tuple(names)
        self.ahead = int(ahead)
        self.token = token
        self.starts = np.r_[0, np.cumsum(ds[self.names[0]].chunks[0])]
        self._sources, self._blocks = {}, {}
        for name in self.names:
            if name not in ds:
                continue
            arr = ds[name].data
            src = array_source(arr)
            if src is None:
                self._blocks[name] = arr.to_delayed().ravel()
            else:
                self._sources[name] = dask.delayed(src, name=f"source-{name}-{token}", pure=True)
        self._ticks: list = []

    @property
    def paced(self) -> bool:
        return bool(self._sources)

    def read(self, i: int) -> list:
        """Delayed blocks of chunk ``i`` (one per name; ``None`` for a missing variable)."""
        lo, hi = int(self.starts[i]), int(self.starts[i + 1])
        gate = self._ticks[-self.ahead] if len(self._ticks) >= self.ahead else None
        out = []
        for name in self.names:
            if name in self._sources:
                out.append(dask.delayed(_read_rows, pure=True)(self._sources[name], lo, hi, gate,
                                                               dask_key_name=f"read-{name}-{self.token}-{i}"))
            elif name in self._blocks:
                out.append(self._blocks[name][i])
            else:
                out.append(None)
        return out

    def folded(self, acc, i: int) -> None:
        """Record that ``acc`` (a delayed fold of chunk ``i``) gates later reads."""
        self._ticks.append(dask.delayed(_tick, pure=True)(acc, dask_key_name=f"tick-{self.token}-{i}"))
