"""Bin assignment: S/N bins, Teff x [M/H] physical bins, and cells.

Pure NumPy kernels; they work unchanged on dask arrays through
``dask.array.map_blocks`` or ``xarray.apply_ufunc``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "snr_bin",
    "median_snr_bin",
    "phys_bin",
    "cell_index",
    "tertile_edges",
    "phys_bin_names",
]


def median_snr_bin(ratio: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """``snr_bin(np.median(ratio, axis=1), edges)`` without the median, for finite rows.

    The median of a row exceeds an edge ``e`` exactly when more than half of the row does (odd length), or
    (even length ``2m``) certainly when at least ``m + 1`` entries do and certainly not when at most ``m - 1``
    do; only rows with exactly ``m`` entries above some edge need their median. Counting is a few compares
    per entry instead of a selection (the Bayes ceiling bins ~1,500 simulated spectra per observed one).
    """
    ratio = np.asarray(ratio)
    n, p = ratio.shape
    above = np.stack([np.count_nonzero(ratio > e, axis=1) for e in edges], axis=1)  # (n, edges)
    if p % 2:
        return np.count_nonzero(above >= (p + 1) // 2, axis=1).astype(np.int8)
    out = np.count_nonzero(above >= p // 2 + 1, axis=1).astype(np.int8)
    tie = np.flatnonzero((above == p // 2).any(axis=1))
    if tie.size:
        out[tie] = snr_bin(np.median(ratio[tie], axis=1), edges)
    return out


def snr_bin(snr: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """S/N bin index with right-closed bins: ``X <= e0 < L <= e1 < ...``.

    Parameters
    ----------
    snr : ndarray of shape (n,)
    edges : sequence of float, strictly increasing
        With the default ``(2, 4, 7)``: 0 = X (S/N <= 2), 1 = L, 2 = M, 3 = H (> 7).

    Returns
    -------
    ndarray of shape (n,), int8. NaN S/N raises, because it cannot be routed.
    """
    snr = np.asarray(snr)
    if np.isnan(snr).any():
        raise ValueError(f"snr_bin: {int(np.isnan(snr).sum())} NaN S/N values cannot be binned")
    return np.searchsorted(np.asarray(edges, dtype=np.float64), snr, side="left").astype(np.int8)


def phys_bin(teff: np.ndarray, mh: np.ndarray, teff_edges: Sequence[float], mh_edges: Sequence[float]) -> np.ndarray:
    """Teff x [M/H] bin index, ``teff_bin * (len(mh_edges) + 1) + mh_bin``.

    Bins are right-closed like :func:`snr_bin`; values beyond the outer edges
    fall in the first or last bin.

    Returns
    -------
    ndarray of shape (n,), int16
    """
    t = np.searchsorted(np.asarray(teff_edges, dtype=np.float64), np.asarray(teff), side="left")
    m = np.searchsorted(np.asarray(mh_edges, dtype=np.float64), np.asarray(mh), side="left")
    return (t * (len(mh_edges) + 1) + m).astype(np.int16)


def cell_index(phys: np.ndarray, snr: np.ndarray, n_snr_bins: int) -> np.ndarray:
    """Cell = (physical bin, S/N bin) pair, flattened as ``phys * n_snr_bins + snr``."""
    return (np.asarray(phys, dtype=np.int32) * n_snr_bins + np.asarray(snr, dtype=np.int32)).astype(np.int16)


def tertile_edges(values: np.ndarray, n_bins: int = 3) -> list[float]:
    """Inner edges that cut ``values`` into ``n_bins`` equal-count bins."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size < n_bins:
        raise ValueError(f"need at least {n_bins} finite values to place quantile edges, got {values.size}")
    edges = np.quantile(values, np.arange(1, n_bins) / n_bins)
    if np.any(np.diff(edges) <= 0):
        raise ValueError(f"quantile edges are not strictly increasing ({edges}); set the edges in config")
    return [float(e) for e in edges]


def phys_bin_names(teff_edges: Sequence[float], mh_edges: Sequence[float]) -> list[str]:
    """Readable names such as ``'T0_M2'`` (Teff bin 0, [M/H] bin 2)."""
    return [f"T{t}_M{m}" for t in range(len(teff_edges) + 1) for m in range(len(mh_edges) + 1)]
