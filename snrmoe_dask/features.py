"""The small per-spectrum feature table.

* the seeds' frozen **quality features**: 10 aggregate statistics of the error
  vector over good pixels (mean, std, min, max, median, sum, q25, q75, skew,
  kurtosis), which keep the S/N information and drop the logg leak;
* an **S/N estimate**: median over good pixels of observed flux / error;
* **physical line indices** (:mod:`snrmoe_dask.lines`): pseudo equivalent
  widths of Na I, the Ca II triplet, Mg I, K I, Paschen, TiO... -- the inputs
  of the physical gates (the PCA projections join them in the gate table,
  since the PCA needs the finished statistics);
* pixel bookkeeping from the same read: ``n_good``, the bad-pixel counts per
  reason (``n_bad_flux``, ``n_bad_error``, ``n_masked``, as
  :func:`~snrmoe_dask.catalog.pixel_counts`) and ``usable``.

Kernels work on one block of NumPy rows; :func:`feature_table` maps them
lazily over the cube (one task per chunk, no compute).
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr

from .catalog import good_pixel_mask, pixel_counts
from .lines import LINE_NAMES, index_windows, line_indices

__all__ = ["QUALITY_FEATURES", "LINE_NAMES", "PIXEL_COUNTS", "FEATURE_NAMES", "quality_features", "snr_estimate",
           "block_features", "feature_table"]

QUALITY_FEATURES = ("q_mean", "q_std", "q_min", "q_max", "q_median", "q_sum", "q_q25", "q_q75", "q_skew",
                    "q_kurtosis")
PIXEL_COUNTS = ("n_bad_flux", "n_bad_error", "n_masked", "n_good")
FEATURE_NAMES = (*QUALITY_FEATURES, "snr_est", *LINE_NAMES, *PIXEL_COUNTS)
_Q, _S, _L = len(QUALITY_FEATURES), len(QUALITY_FEATURES) + 1, len(QUALITY_FEATURES) + 1 + len(LINE_NAMES)


def _row_quantiles(sorted_vals: np.ndarray, n_good: np.ndarray, qs: tuple[float, ...]) -> list[np.ndarray]:
    """Linear-interpolated quantiles (NumPy's default) of rows whose first
    ``n_good`` entries are the sorted good values."""
    rows = np.arange(sorted_vals.shape[0])
    out = []
    for q in qs:
        pos = q * np.maximum(n_good - 1, 0)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, np.maximum(n_good - 1, 0))
        frac = pos - lo
        out.append(sorted_vals[rows, lo] * (1 - frac) + sorted_vals[rows, hi] * frac)
    return out


def good_quantiles(vals: np.ndarray, good: np.ndarray, qs: tuple[float, ...]) -> list[np.ndarray]:
    """Per-row linear-interpolated quantiles of the good entries, float64.

    One sort per row (bad entries set to NaN sort last) gives every order
    statistic; NumPy's SIMD sort beats ``np.partition`` at several ranks.
    Rows with no good entry give NaN.
    """
    n_good = good.sum(axis=1)
    srt = np.sort(vals if good.all() else np.where(good, vals, np.nan), axis=1)
    out = _row_quantiles(srt, n_good, qs)
    for o in out:
        o[n_good == 0] = np.nan
    return out


def _moments(vals: np.ndarray, valid: np.ndarray, n_good: np.ndarray) -> tuple[np.ndarray, ...]:
    """Sum, mean and central moments 2-4 of the valid entries of each row (float64)."""
    all_valid = bool(valid.all())
    v = vals.astype(np.float64) if all_valid else np.where(valid, vals, 0.0).astype(np.float64)
    total = v.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / n_good
        v -= mean[:, None]  # v is our own float64 copy: centre it in place
        d = v if all_valid else np.where(valid, v, 0.0)
        d2 = d * d  # explicit products: float ** 3 would go through the slow generic pow
        m2 = d2.sum(axis=1) / n_good
        m3 = np.einsum("ij,ij->i", d2, d) / n_good  # row dot products: no (n, P) temporaries
        m4 = np.einsum("ij,ij->i", d2, d2) / n_good
    return total, mean, m2, m3, m4


def quality_features(error: np.ndarray, good: np.ndarray) -> np.ndarray:
    """The 10 aggregate statistics of ``error`` over good pixels.

    Parameters
    ----------
    error : ndarray of shape (n, P)
    good : ndarray of bool, shape (n, P)

    Returns
    -------
    ndarray of shape (n, 10), float64, columns :data:`QUALITY_FEATURES`.
    ``skew`` and ``kurtosis`` are the biased moment estimators of
    ``scipy.stats.skew`` / ``scipy.stats.kurtosis`` (Fisher, excess). Rows
    with no good pixel are NaN.
    """
    n_good = good.sum(axis=1)
    total, mean, m2, m3, m4 = _moments(error, good, n_good)
    with np.errstate(invalid="ignore", divide="ignore"):
        skew = m3 / m2**1.5
        kurt = m4 / m2**2 - 3.0
    q0, q25, q50, q75, q100 = good_quantiles(error, good, (0.0, 0.25, 0.5, 0.75, 1.0))
    out = np.stack([mean, np.sqrt(m2), q0, q100, q50, total, q25, q75, skew, kurt], axis=1)
    out[n_good == 0] = np.nan
    return out


def snr_estimate(flux: np.ndarray, error: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Observed S/N: median over good pixels of flux / error, shape (n,), float64.

    The ratios are divided in the precision of the inputs (float32 for a
    catalog) and the median interpolates the two middle order statistics in
    float64. Rounding each ratio keeps their order, so the result equals the
    float64 median with its order statistics rounded to float32 (relative
    difference at most 2**-24); a row whose float32 ratios overflow is
    computed in float64.
    """
    dtype = np.result_type(flux.dtype, error.dtype, np.float32)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        ratio = np.divide(flux, error, dtype=dtype)
    med = _median_of_good(ratio, good)
    if dtype != np.float64:
        redo = np.flatnonzero(~np.isfinite(med) & good.any(axis=1))
        if redo.size:  # overflow in the working precision (hostile scales): those rows in float64
            with np.errstate(invalid="ignore", divide="ignore"):
                med[redo] = _median_of_good(flux[redo].astype(np.float64) / error[redo], good[redo])
    return med


def _median_of_good(ratio: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Per-row median of the good entries, float64 (NaN for a row without one)."""
    full = good.all(axis=1)
    if not full.all():
        (med,) = good_quantiles(ratio, good, (0.5,))
        if not full.any():
            return med
    else:
        med = np.empty(ratio.shape[0])
    # rows without a bad pixel (the common case): one selection instead of a sort
    p = ratio.shape[1]
    half = p // 2
    part = np.partition(ratio if full.all() else ratio[full], half, axis=1)
    upper = part[:, half].astype(np.float64)
    # the same arithmetic as the sorted path's interpolation (lo * 0.5 + hi * 0.5)
    med[full] = upper if p % 2 else part[:, :half].max(axis=1).astype(np.float64) * 0.5 + upper * 0.5
    return med


def block_features(flux: np.ndarray, error: np.ndarray, mask: np.ndarray | None = None,
                   wavelength: np.ndarray | None = None, rows_per_step: int = 256) -> np.ndarray:
    """All features of one block, shape (n, len(FEATURE_NAMES)), float64.

    Rows are processed ``rows_per_step`` at a time so the float64 temporaries
    stay small (large fresh allocations cost page faults, not arithmetic).
    Without ``wavelength`` the line indices are NaN.
    """
    out = np.empty((flux.shape[0], len(FEATURE_NAMES)))
    windows = None if wavelength is None else index_windows(wavelength)
    for lo in range(0, flux.shape[0], rows_per_step):
        sl = slice(lo, lo + rows_per_step)
        f, e = flux[sl], error[sl]
        m = None if mask is None else mask[sl]
        good = good_pixel_mask(f, e, m)
        out[sl, :_Q] = quality_features(e, good)
        out[sl, _Q] = snr_estimate(f, e, good)
        out[sl, _S:_L] = np.nan if windows is None else line_indices(f, good, wavelength, windows)
        # a block whose every pixel is good (no mask set, every value finite, every error > 0) has nothing to count
        out[sl, _L:] = (0, 0, 0, f.shape[1]) if good.all() else pixel_counts(f, e, m)
    return out


def feature_table(ds: xr.Dataset, min_good_fraction: float = 0.5) -> xr.Dataset:
    """Lazy feature table of a catalog: one task per chunk, dims (spectrum,).

    Returns
    -------
    Dataset with the variables :data:`FEATURE_NAMES` (float64) and ``usable``
    (bool), backed by dask; nothing is computed here.
    """
    flux, error = ds["flux"].data, ds["error"].data
    args = [flux, error] + ([ds["mask"].data] if "mask" in ds else [])
    wavelength = np.asarray(ds["wavelength"].values, np.float64)

    def _kernel(f, e, *m):
        return block_features(f, e, m[0] if m else None, wavelength)

    feats = da.map_blocks(_kernel, *args, dtype=np.float64,
                          chunks=(flux.chunks[0], (len(FEATURE_NAMES),)), name="features")
    out = xr.Dataset({name: ("spectrum", feats[:, i]) for i, name in enumerate(FEATURE_NAMES)},
                     coords={"spectrum": ds["spectrum"]})
    out["usable"] = out["n_good"] >= int(np.ceil(min_good_fraction * ds.sizes["wavelength"]))
    out.attrs["min_good_fraction"] = min_good_fraction
    return out
