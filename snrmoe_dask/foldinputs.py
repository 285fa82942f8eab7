"""The per-row inputs of the pass's folds (targets, cells, the audit's rows), read by chunk from a small store.

A fold needs, beside its chunk of the cube, the target and the cell of each
of the chunk's rows and the audit's rows among them. Embedded in the task
graph, those slices made the graph grow with N: 25 MB at 1M (dask warns above
10 MB and the scheduler holds all of it), about 250 MB at 10M. Here the client
writes them once, before the pass, into a zarr store of a few bytes per row
(``y`` float64, ``cell`` int32, and the audit's rows, about a tenth of the
train rows at most: ``audit.max_rows``); each fold then depends on one small
read task of its rows, so the graph holds a path and four integers per chunk
whatever N is. A read task can run again on any worker (unlike scattered
data, which is lost with the worker that held it).

Without a store (:func:`fold_inputs` with ``store=None``: the benchmarks, an
in-memory threads run) each chunk's inputs are embedded as before.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import dask
import numpy as np
import zarr

from .leakage import AuditPlan

__all__ = ["FOLD_INPUTS", "fold_inputs", "read_fold_inputs", "write_fold_inputs"]

#: the store's name in a model directory while its pass runs (removed when the pass is done)
FOLD_INPUTS = "fold-inputs.zarr"

#: rows per zarr chunk of the store (a fold reads the one or two chunks that overlap its rows)
STORE_CHUNK = 65_536


def write_fold_inputs(path: str | Path, y: np.ndarray, cell: np.ndarray, audit: AuditPlan | None) -> None:
    """Write ``y``, ``cell`` and the audit's rows (positions, groups, targets, labels) to a zarr store at
    ``path``, replacing an earlier one (written as ``PATH.tmp`` and renamed)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    n = y.shape[0]
    group.create_array("y", data=np.asarray(y, np.float64), chunks=(min(STORE_CHUNK, max(n, 1)),))
    if cell.size and (cell.min() < np.iinfo(np.int32).min or cell.max() > np.iinfo(np.int32).max):
        raise ValueError("cell indices do not fit int32")
    group.create_array("cell", data=np.asarray(cell, np.int32), chunks=(min(STORE_CHUNK, max(n, 1)),))
    if audit is not None:
        rows = np.flatnonzero(audit.group >= 0)
        m = max(rows.size, 1)
        for name, data in (("audit_position", rows.astype(np.int64)), ("audit_group", audit.group[rows]),
                           ("audit_targets", audit.targets[rows]), ("audit_labels", audit.labels[rows])):
            group.create_array(name, data=np.ascontiguousarray(data),
                               chunks=(min(STORE_CHUNK, m),) + np.shape(data)[1:])
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def read_fold_inputs(path: str, lo: int, hi: int, a0: int, a1: int) -> tuple:
    """One chunk's ``(y, cell, audit_block)`` from the store: rows ``lo:hi``, the audit's rows ``a0:a1``
    (``audit_block`` as :meth:`~snrmoe_dask.leakage.AuditPlan.block` gives it, ``None`` when empty)."""
    group = zarr.open_group(path, mode="r")
    y, cell = group["y"][lo:hi], group["cell"][lo:hi].astype(np.int64)
    if y.shape[0] != hi - lo:
        raise ValueError(f"{path}: rows {lo}:{hi} asked, the store holds {group['y'].shape[0]}")
    block = None
    if a1 > a0:
        pos = group["audit_position"][a0:a1]
        block = ((pos - lo).astype(np.int32), group["audit_group"][a0:a1], group["audit_targets"][a0:a1],
                 group["audit_labels"][a0:a1])
    return y, cell, block


def fold_inputs(y: np.ndarray, cell: np.ndarray, audit: AuditPlan | None, starts: np.ndarray,
                store: str | Path | None, token: str) -> list:
    """Each chunk's fold inputs ``(y, cell, audit_block)``: a lazy read of the store written here, or the
    embedded slices when ``store`` is None."""
    bounds = [(int(starts[i]), int(starts[i + 1])) for i in range(len(starts) - 1)]
    if store is None:
        return [(y[lo:hi], cell[lo:hi], None if audit is None else audit.block(lo, hi)) for lo, hi in bounds]
    write_fold_inputs(store, y, cell, audit)
    positions = np.flatnonzero(audit.group >= 0) if audit is not None else np.empty(0, np.int64)
    edges = np.searchsorted(positions, np.asarray(starts))
    read = dask.delayed(read_fold_inputs, pure=True)
    return [read(str(Path(store).absolute()), lo, hi, int(edges[i]), int(edges[i + 1]),
                 dask_key_name=f"fold-inputs-{token}-{i}") for i, (lo, hi) in enumerate(bounds)]
