"""The one pass over the cube: features for every row, statistics of train rows.

Graph plan (all lazy: nothing reads the cube here; with ``inputs_store`` the folds' small store is written)::

    read chunk i ──┬── features(i) [+ its cached rows]    (every row)
                   └── fold(acc[c], i)  for c = i mod C   (train rows, audit rows)
    fold-inputs(i) ───┘  (y, cell and audit rows of chunk i, read from a small store: not in the graph)
    acc[c] chain:  init(shift) → fold → fold → ... → finalize
    stats = the C finalised accumulators merged pairwise (a tree, in place)

A chain's state (:class:`~snrmoe_dask.chain.ChainState`) is a
:class:`~snrmoe_dask.stats.CellAccumulator` (the cells) with the baselines'
and the audit's accumulators beside it, so everything the study needs from the flux comes out
of the same fold of the same block.

* **Bounded memory.** Each of the ``C`` chains owns one
  :class:`~snrmoe_dask.stats.CellAccumulator` (K·P(P+1)/2·8 bytes packed + buffers) and
  folds its chunks into it in place, so the partial sums never multiply with
  the number of chunks: peak ≈ C × accumulator + in-flight chunks,
  whatever N is.
* **One read.** Features and folds depend on the same chunk-read tasks, so
  computing them together reads the cube once. Reads are paced by the chain
  (:class:`~snrmoe_dask.pacing.PacedReads`): at most ``read_ahead`` chunks
  per chain wait in memory for their fold.
* **Fault tolerance.** A chain is a plain dependency chain: if a worker dies,
  dask recomputes the lost chain from its start, giving the same sums.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import dask
import numpy as np
import xarray as xr
from dask.base import tokenize

from .baselines import BaselineAccumulator, BaselineStats
from .bins import snr_bin
from .blas import blas_threads
from .cache import CachePart, write_part
from .catalog import good_pixel_mask
from .chain import ChainState
from .checkpoint import Checkpoint
from .features import FEATURE_NAMES, PIXEL_COUNTS, block_features
from .foldinputs import fold_inputs
from .leakage import AuditAccumulator, AuditPlan, AuditStats, audit_shifts
from .pacing import PacedReads
from .stats import CellAccumulator, SufficientStats, impute_bad_pixels, memory_bytes

__all__ = ["PassGraph", "SnrRouting", "auto_chains", "fold_blas_pieces", "one_pass", "shift_from_block"]

_SNR_EST = FEATURE_NAMES.index("snr_est")
_N_GOOD = FEATURE_NAMES.index("n_good")


class SnrRouting(NamedTuple):
    """Route train rows by the S/N estimate of the feature table (a catalog without a true ``snr``): ``cell``
    then holds each train row's physical bin, and the fold makes the cell from the block's features."""

    n_snr: int
    edges: tuple[float, ...]

    def cells(self, phys: np.ndarray, features: np.ndarray) -> np.ndarray:
        s = snr_bin(np.nan_to_num(features[:, _SNR_EST], nan=0.0), self.edges)
        return np.where(phys >= 0, phys * self.n_snr + s, -1).astype(np.int64)


class PassGraph(NamedTuple):
    """The lazy results of :func:`one_pass`."""

    stats: object  # Delayed SufficientStats
    features: list  # Delayed feature blocks, one per chunk
    baselines: object  # Delayed BaselineStats or None
    audit: object  # Delayed AuditStats or None


def shift_from_block(flux: np.ndarray, error: np.ndarray, mask: np.ndarray | None, min_good: int,
                     cell: np.ndarray | None = None, n_cells: int = 1) -> dict[str, np.ndarray]:
    """Accumulation shifts from one block: ``{"all": (P,), "cells": (n_cells, P)}``.

    ``all`` is the mean imputed spectrum of the block's usable rows; each
    cell's shift is the mean of its usable rows in the block (``all`` for a
    cell with none), so a bright and a faint cell are each summed about
    their own level. Every chain gets the same shifts.
    """
    good = good_pixel_mask(flux, error, mask)
    usable = good.sum(axis=1) >= min_good
    x = impute_bad_pixels(flux[usable] if usable.any() else flux, good[usable] if usable.any() else good)
    overall = x.mean(axis=0, dtype=np.float64)
    cells = np.tile(overall, (n_cells, 1))
    if cell is not None and usable.any():
        c = np.asarray(cell)[usable]  # aligned with x, the usable rows
        for k in np.unique(c[c >= 0]):
            cells[k] = x[c == k].mean(axis=0, dtype=np.float64)
    return {"all": overall, "cells": cells}


def _shifts(flux, error, mask, min_good: int, cell: np.ndarray, n_cells: int, routing: SnrRouting | None,
            features: np.ndarray | None, audit_group: np.ndarray | None, n_groups: int) -> dict:
    """Every shift of the chains from the first block (cells, baselines, audit)."""
    if routing is not None:
        cell = routing.cells(cell, features)
    out = shift_from_block(flux, error, mask, min_good, cell, n_cells)
    if audit_group is not None:
        out["audit"] = audit_shifts(flux, error, mask, audit_group, n_groups)
    return out


def _init(shift, n_cells, flush_rows, precision, meta, baselines=(), checkpoint: Checkpoint | None = None,
          chain: int = 0, audit: tuple[int, str] | None = None) -> ChainState:
    if checkpoint is not None:
        state = checkpoint.load_chain(chain, flush_rows, precision, baselines, audit)
        if state is not None:
            state.cells.stats.meta = meta
            return state
    return ChainState(
        CellAccumulator(n_cells, shift["cells"], flush_rows=flush_rows, precision=precision, meta=meta),
        BaselineAccumulator(baselines, shift["all"], flush_rows, precision) if baselines else None,
        AuditAccumulator(shift["audit"], *audit) if audit is not None else None)


def _fold(state: ChainState, index: int, flux, error, mask, inputs: tuple, min_good: int,
          blas_pieces: int, features=None, checkpoint: Checkpoint | None = None, chain: int = 0,
          routing: SnrRouting | None = None) -> ChainState:
    """Fold one chunk into a chain; ``inputs`` = ``(y, cell, audit_block)`` of its rows
    (:func:`~snrmoe_dask.foldinputs.fold_inputs`)."""
    if index in state.chunks_done:  # a retried task must not count a chunk twice
        return state
    y, cell, audit_block = inputs
    if routing is not None:
        cell = routing.cells(cell, features)
    good, n_good = _good_pixels(flux, error, mask, features)
    usable = n_good >= min_good
    state.excluded_unusable += int(((cell >= 0) & ~usable).sum())
    keep = np.where(usable, cell, -1)
    # each Gram update runs as ``blas_pieces`` single-threaded BLAS calls at once (the chain's share of the
    # worker's cores): none of them waits for a BLAS thread that a chunk read has pushed off its core
    state.use_blas_pieces(blas_pieces)
    with blas_threads(1):
        x = impute_bad_pixels(flux, good, copy=False)  # the block is shared with the features task
        state.cells.add(x, y, keep)
        if state.baselines is not None:
            state.baselines.add(x, flux, error, good, features, y, keep >= 0)
        if audit_block is not None:
            state.audit.add(flux, error, mask, features, *audit_block)
    state.chunks_done.append(index)
    state.folds += 1
    if checkpoint is not None and state.folds % checkpoint.every == 0:
        checkpoint.save_chain(chain, state)
    return state


def _good_pixels(flux, error, mask, features) -> tuple[np.ndarray | None, np.ndarray]:
    """The block's good-pixel mask and good pixels per row. The mask is ``None`` when the block's feature rows
    count every pixel good (the common case): the fold then makes no block-sized mask, and neither
    imputation nor whitening looks for bad pixels."""
    if features is not None:
        n_good = features[:, _N_GOOD]
        if (n_good == flux.shape[1]).all():
            return None, n_good
    good = good_pixel_mask(flux, error, mask)
    return good, good.sum(axis=1)


def _finish(state: ChainState) -> tuple:
    """One chain's finalised statistics (cells, baselines, audit) and its counts; frees its buffers."""
    base = state.baselines.finalize() if state.baselines is not None else None
    audit = state.audit.finalize() if state.audit is not None else None
    counts = {"excluded": state.excluded_unusable, "resumed": state.resumed_chunks,
              "folded": len(state.chunks_done) - state.resumed_chunks}
    return state.cells.finalize(), base, audit, counts


def _merge(a: tuple, b: tuple) -> tuple:
    """Two finished chains as one (b's sums added into a's arrays in place)."""
    stats, base, audit, counts = a
    stats.iadd(b[0])
    base = b[1] if base is None else (base if b[1] is None else base + b[1])
    audit = b[2] if audit is None else (audit if b[2] is None else audit.iadd(b[2]))
    return stats, base, audit, {k: counts[k] + b[3][k] for k in counts}


def _seal(part: tuple) -> tuple[SufficientStats, BaselineStats | None, AuditStats | None]:
    total, base, audit, counts = part
    total.meta["train_rows_excluded_unusable"] = int(counts["excluded"])
    total.meta["chunks_from_checkpoint"] = int(counts["resumed"])
    total.meta["chunks_folded"] = int(counts["folded"])
    return total, base, audit


def _features(flux, error, mask, wavelength, checkpoint: Checkpoint | None = None, index: int = 0,
              cache_parts: tuple[CachePart, ...] = ()) -> np.ndarray:
    for part in cache_parts:  # before the features' checkpoint: a chunk with saved features has its parts
        write_part(part, flux, error, mask)
    out = block_features(flux, error, mask, wavelength)
    if checkpoint is not None:
        checkpoint.save_features(index, out)
    return out


def auto_chains(n_threads: int, n_chunks: int, n_cells: int, n_features: int, flush_rows: int, precision: str,
                memory_budget: float) -> int:
    """Parallel accumulators: one per thread but one, bounded by chunks and by memory. A chain's Gram
    updates are GIL-free and split over the cores (:func:`fold_blas_pieces`), so one chain already keeps
    the other threads busy."""
    per_chain = memory_bytes(n_cells, n_features, flush_rows, precision)
    by_memory = max(1, int(memory_budget // per_chain))
    return max(1, min(n_threads - 1, by_memory, math.ceil(n_chunks / 4)))


def fold_blas_pieces(threads: int, chains: int, threads_per_worker: int | None = None) -> int:
    """Single-threaded BLAS calls per Gram update of a fold: the cluster's ``threads`` shared by the
    chains, at most one worker's threads (a fold runs on one worker).

    A fold's update is cut into that many column panels computed at once
    (:func:`~snrmoe_dask.blas.syrk_update`), GIL-free, so a lone chain uses
    every core, and the chunk reads and features of the worker's other
    thread take their turn on a core without stalling the update. A
    multithreaded BLAS call did stall: its threads wait for each other, and
    on 2 cores one BLAS thread (the other core left to the reads) was faster
    than two (README, "The GIL").
    """
    return max(1, min(threads_per_worker or threads, threads // max(1, chains)))


def one_pass(ds: xr.Dataset, y: np.ndarray, cell: np.ndarray, *, n_cells: int, chains: int = 1,
             flush_rows: int = 1024, precision: str = "float32", min_good_fraction: float = 0.5,
             meta: dict | None = None, blas_pieces: int = 1, baselines: tuple[str, ...] = (),
             checkpoint: Checkpoint | None = None, read_ahead: int = 4,
             row_cache: list[tuple[CachePart, ...]] | None = None, routing: SnrRouting | None = None,
             audit: AuditPlan | None = None, inputs_store: str | Path | None = None) -> PassGraph:
    """Build the lazy one-pass graph.

    Parameters
    ----------
    ds : xarray.Dataset
        A catalog from :func:`~snrmoe_dask.catalog.open_catalog` (dask-backed).
    y : ndarray of shape (N,)
        Target (logg); ignored where ``cell < 0``.
    cell : ndarray of int, shape (N,)
        Cell of each train row, ``-1`` for rows that are not trained on
        (with ``routing``: the physical bin of each train row).
    n_cells, chains, flush_rows, precision, min_good_fraction
        Accumulation layout (see :class:`~snrmoe_dask.stats.CellAccumulator`).
    meta : dict
        Stored with the statistics.
    blas_pieces : int
        Single-threaded BLAS calls each Gram update of a fold runs at once
        (:func:`fold_blas_pieces`); the updates release the GIL, so the
        worker's other threads read and compute features meanwhile.
    baselines : tuple of str
        Baselines (:data:`~snrmoe_dask.baselines.BASELINES`) whose statistics
        the same folds accumulate.
    checkpoint : Checkpoint, optional
        An opened :class:`~snrmoe_dask.checkpoint.Checkpoint`: chunks it holds
        are neither read nor folded again, and every chain saves its state
        every ``checkpoint.every`` folds.
    read_ahead : int
        Chunks per chain that may be read before the chain has folded them
        (:class:`~snrmoe_dask.pacing.PacedReads`): bounds the blocks waiting
        in memory, whatever N is.
    row_cache : list of tuples of CachePart, optional
        One entry per chunk (:func:`~snrmoe_dask.cache.plan_row_cache`): the
        features task of each chunk writes its cached rows from the block it
        already holds, so the cache costs no read.
    routing : SnrRouting, optional
        Make each train row's cell from its S/N estimate inside the fold (a
        catalog without a true ``snr``): no features-first pass.
    audit : AuditPlan, optional
        Fold the audit's rows (:mod:`snrmoe_dask.audit`) in the same chains.
    inputs_store : path, optional
        Where to write the folds' per-row inputs (``y``, ``cell``, the audit's
        rows; :mod:`snrmoe_dask.foldinputs`), a small zarr store that each fold
        reads its rows from, so the graph does not grow with N. Without it
        each chunk's rows are embedded in the graph.

    Returns
    -------
    PassGraph
        ``stats``: the summed :class:`~snrmoe_dask.stats.SufficientStats`
        (keep it on the cluster; compute only small things that depend on
        it); ``features``: one (rows, len(FEATURE_NAMES)) block per chunk, in
        order; ``baselines``: the summed
        :class:`~snrmoe_dask.baselines.BaselineStats` (``None`` without
        baselines); ``audit``: the summed
        :class:`~snrmoe_dask.audit.AuditStats` (``None`` without ``audit``).
    """
    n, p = ds.sizes["spectrum"], ds.sizes["wavelength"]
    if y.shape != (n,) or cell.shape != (n,):
        raise ValueError(f"y and cell must have shape ({n},), got {y.shape} and {cell.shape}")
    min_good = int(np.ceil(min_good_fraction * p))
    starts = np.r_[0, np.cumsum(ds["flux"].chunks[0])]
    n_chunks = len(starts) - 1
    chains = max(1, min(chains, n_chunks))
    baselines = tuple(baselines)
    tok = tokenize(ds["flux"].data.name, ds["error"].data.name, y, cell, n_cells, chains, flush_rows, precision,
                   min_good, baselines, [[q.path for q in parts] for parts in row_cache or []], routing,
                   None if audit is None else (audit.group, audit.targets, audit.flush_rows, audit.precision))
    reads = PacedReads(ds, ("flux", "error", "mask"), read_ahead * chains, tok)

    wave = dask.delayed(np.asarray(ds["wavelength"].values, np.float64), name=f"wavelength-{tok}")
    states = [checkpoint.chain_state(c) if checkpoint else None for c in range(chains)]
    done = [set(st["chunks_done"]) if st else set() for st in states]
    feats_done = checkpoint.features_done() if checkpoint else set()
    audit_args = None if audit is None else (audit.flush_rows, audit.precision)
    inputs = fold_inputs(y, cell, audit, starts, inputs_store, tok)
    audit_rows = np.zeros(n, bool) if audit is None else audit.group >= 0
    init = dask.delayed(_init, pure=True)
    fold = dask.delayed(_fold, pure=True)
    feats = []
    accs: list = []
    for i in range(n_chunks):
        lo, hi = int(starts[i]), int(starts[i + 1])
        c = i % chains
        fb, eb, mb = reads.read(i)
        if i in feats_done:
            feats.append(dask.delayed(checkpoint.load_features, pure=True)(i, dask_key_name=f"features-{tok}-{i}"))
        else:
            part = row_cache[i] if row_cache is not None else ()
            feats.append(dask.delayed(_features, pure=True)(fb, eb, mb, wave, checkpoint, i, part,
                                                            dask_key_name=f"features-{tok}-{i}"))
        if i == 0:  # the chains' shifts come from the first block (and its features, to route by S/N)
            shift = (dask.delayed(_shifts, pure=True)(
                fb, eb, mb, min_good, cell[lo:hi], n_cells, routing, feats[0] if routing else None,
                None if audit is None else audit.group[lo:hi], 0 if audit is None else audit.n_groups,
                dask_key_name=f"shifts-{tok}") if not all(states) else None)
            accs = [init(shift, n_cells, flush_rows, precision, dict(meta or {}), baselines, checkpoint, k,
                         audit_args, dask_key_name=f"acc-init-{tok}-{k}") for k in range(chains)]
        # the fold takes the chunk's feature rows even when no baseline needs them: then the chunk's
        # block is released as soon as it is folded (independent features tasks were scheduled late,
        # holding dozens of read blocks in memory)
        if ((cell[lo:hi] >= 0).any() or audit_rows[lo:hi].any()) and i not in done[c]:
            accs[c] = fold(accs[c], i, fb, eb, mb, inputs[i], min_good, blas_pieces,
                           feats[-1], checkpoint, c, routing, dask_key_name=f"acc-fold-{tok}-{c}-{i}")
            reads.folded(accs[c], i)
    # chains merge pairwise, a tree of log2(C) rounds: a task holds two chains' statistics, never all C
    parts = [dask.delayed(_finish, pure=True)(acc, dask_key_name=f"stats-finish-{tok}-{k}")
             for k, acc in enumerate(accs)]
    level = 0
    while len(parts) > 1:
        parts = [dask.delayed(_merge, pure=True)(parts[j], parts[j + 1],
                                                 dask_key_name=f"stats-merge-{tok}-{level}-{j}")
                 if j + 1 < len(parts) else parts[j] for j in range(0, len(parts), 2)]
        level += 1
    out = dask.delayed(_seal, pure=True, nout=3)(parts[0], dask_key_name=f"stats-finalize-{tok}")
    return PassGraph(out[0], feats, out[1], out[2])


def features_dataset(blocks: list[np.ndarray], ds: xr.Dataset, min_good_fraction: float) -> xr.Dataset:
    """Assemble computed feature blocks into the feature table Dataset."""
    arr = np.concatenate(blocks, axis=0)
    out = xr.Dataset({name: ("spectrum", arr[:, i]) for i, name in enumerate(FEATURE_NAMES)},
                     coords={"spectrum": ds["spectrum"].values})
    for name in PIXEL_COUNTS:
        out[name] = out[name].astype(np.int32)
    out["usable"] = out["n_good"] >= int(np.ceil(min_good_fraction * ds.sizes["wavelength"]))
    out.attrs["min_good_fraction"] = min_good_fraction
    return out
