"""The per-row inputs of the pass's folds (targets, cells, the audit's rows), read by chunk from a small store.

A fold needs, beside its chunk of the cube, the target and the cell of each
of the chunk's rows and the audit's rows among them. Embedded in the task
graph, those slices made the graph grow with N: 25 MB at 1M (dask warns above
10 MB and the scheduler holds all of it), about 250 MB at 10M. Here the client
writes them once, before the pass, into a zarr store of 16 bytes per row
(``y`` and ``cell``) plus the audit's rows (at most ``audit.max_rows``, about
a tenth of the train rows at 1M); each fold then depends on one small
read task of its rows, so the graph holds a path and four integers per chunk
whatever N is. A read task can run again on any worker (unlike scattered
data, which is lost with the worker that held it).

Without a store (:func:`fold_inputs` with ``store=None``: tests, an
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

#: rows per zarr chunk of the store: a fold reads the one or two chunks that overlap its rows (65,536-row chunks in
#: six arrays took 24 ms a fold, mostly decompressing rows it did not need; two arrays of small chunks take 6 ms)
ROWS_CHUNK, AUDIT_CHUNK = 8192, 2048


def write_fold_inputs(path: str | Path, y: np.ndarray, cell: np.ndarray, audit: AuditPlan | None) -> None:
    """Write the store at ``path`` (as ``PATH.tmp``, renamed; an earlier one is replaced): ``rows`` (N, 2)
    holds ``y`` and ``cell``, ``audit`` (M, 2 + targets + labels) the audit's rows (catalog position, group,
    targets, labels), all float64 (the integers are exact in it)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    rows = np.column_stack([np.asarray(y, np.float64), np.asarray(cell, np.float64)])
    group.create_array("rows", data=rows, chunks=(min(ROWS_CHUNK, max(len(rows), 1)), 2))
    if audit is not None:
        at = np.flatnonzero(audit.group >= 0)
        table = np.column_stack([at, audit.group[at], audit.targets[at], audit.labels[at]]).astype(np.float64)
        group.create_array("audit", data=table, chunks=(min(AUDIT_CHUNK, max(len(table), 1)), table.shape[1]),
                           attributes={"n_targets": int(audit.targets.shape[1])})
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def read_fold_inputs(path: str, lo: int, hi: int, a0: int, a1: int) -> tuple:
    """One chunk's ``(y, cell, audit_block)`` from the store: rows ``lo:hi``, the audit's rows ``a0:a1``
    (``audit_block`` as :meth:`~snrmoe_dask.leakage.AuditPlan.block` gives it, ``None`` when empty)."""
    try:
        group = zarr.open_group(path, mode="r")
    except FileNotFoundError as exc:  # a worker on another filesystem than the client's model directory
        raise FileNotFoundError(f"the pass's fold inputs {path} are not there on this worker: the model directory "
                                "must be on a filesystem every worker sees, as the catalog") from exc
    rows = group["rows"][lo:hi]
    if rows.shape[0] != hi - lo:
        raise ValueError(f"{path}: rows {lo}:{hi} asked, the store holds {group['rows'].shape[0]}")
    block = None
    if a1 > a0:
        table = group["audit"]
        t = 2 + int(table.attrs["n_targets"])
        part = table[a0:a1]
        block = ((part[:, 0].astype(np.int64) - lo).astype(np.int32), part[:, 1].astype(np.int64),
                 np.ascontiguousarray(part[:, 2:t]), np.ascontiguousarray(part[:, t:]))
    return rows[:, 0].copy(), rows[:, 1].astype(np.int64), block


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
