"""Physical line indices of the red arm: NumPy kernels only.

An index is a pseudo-equivalent width: ``1 - <F>_band / <F>_cont``, where
``<F>`` is the mean flux over the *good* pixels of a window and the continuum
is the mean of the two side bands (Worthey et al. 1994; Cenarro et al. 2001
for the Ca II triplet). It is dimensionless, independent of the flux scale,
and positive for absorption.

The list favours gravity-sensitive features of 7100-8850 A: the Na I doublet
(strong in dwarfs), the Ca II triplet (ion: weaker at high gravity, with
pressure-broadened wings), Mg I 8807, K I, the Paschen lines of hot stars, the
O I triplet, Fe I, and two TiO band heads (cool giants vs dwarfs). A window
outside the wavelength grid gives NaN for every row.
"""

from __future__ import annotations

import numpy as np

__all__ = ["LINE_INDICES", "LINE_NAMES", "line_indices", "index_windows"]

#: name -> (band, blue continuum, red continuum), each (lo, hi) in Angstrom.
LINE_INDICES: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "li_KI_7699": ((7655.0, 7705.0), (7630.0, 7650.0), (7710.0, 7730.0)),
    "li_OI_7774": ((7768.0, 7780.0), (7750.0, 7764.0), (7784.0, 7798.0)),
    "li_NaI_8190": ((8178.0, 8200.0), (8140.0, 8165.0), (8230.0, 8260.0)),
    "li_CaT_8498": ((8490.0, 8506.0), (8474.0, 8484.0), (8563.0, 8577.0)),
    "li_CaT_8542": ((8532.0, 8552.0), (8474.0, 8484.0), (8563.0, 8577.0)),
    "li_CaT_8662": ((8653.0, 8671.0), (8619.0, 8642.0), (8700.0, 8725.0)),
    "li_FeI_8688": ((8684.0, 8693.0), (8619.0, 8642.0), (8700.0, 8725.0)),
    "li_Pa_8750": ((8744.0, 8757.0), (8700.0, 8725.0), (8777.0, 8792.0)),
    "li_MgI_8807": ((8802.0, 8811.0), (8777.0, 8792.0), (8826.0, 8840.0)),
    "li_TiO_7589": ((7589.0, 7640.0), (7550.0, 7580.0), (7550.0, 7580.0)),
    "li_TiO_8432": ((8432.0, 8470.0), (8400.0, 8420.0), (8400.0, 8420.0)),
}
LINE_NAMES = tuple(LINE_INDICES)


def index_windows(wavelength: np.ndarray) -> np.ndarray:
    """Boolean window masks, shape (n_indices, 3, P): band, blue, red."""
    wave = np.asarray(wavelength, np.float64)
    out = np.zeros((len(LINE_INDICES), 3, wave.size), bool)
    for i, windows in enumerate(LINE_INDICES.values()):
        for j, (lo, hi) in enumerate(windows):
            out[i, j] = (wave >= lo) & (wave <= hi)
    return out


def line_indices(flux: np.ndarray, good: np.ndarray, wavelength: np.ndarray,
                 windows: np.ndarray | None = None) -> np.ndarray:
    """Line indices of a block of spectra, shape (n, len(LINE_NAMES)), float64.

    Parameters
    ----------
    flux : ndarray of shape (n, P)
    good : ndarray of bool, shape (n, P)
        Usable pixels; bad ones are left out of every window mean.
    wavelength : ndarray of shape (P,)
    windows : ndarray, optional
        :func:`index_windows` of ``wavelength`` (pass it to avoid recomputing).

    Returns
    -------
    ndarray
        ``1 - mean(band) / mean(mean(blue), mean(red))``; NaN where a window
        has no good pixel or the continuum is not positive.
    """
    win = index_windows(wavelength) if windows is None else windows
    # only the pixels inside some window matter (a few hundred of the P)
    cols = np.flatnonzero(win.any(axis=(0, 1)))
    if cols.size == 0:  # the grid misses every window
        return np.full((flux.shape[0], win.shape[0]), np.nan)
    # np.take, not flux[:, cols]: 5x faster for a gather of a thousand columns
    f = np.take(flux, cols, axis=1).astype(np.float64)
    # window sums as one matrix product: (n, P_win) @ (P_win, 3 * n_indices)
    w = win[:, :, cols].reshape(-1, cols.size).T.astype(np.float64)
    good = np.take(good, cols, axis=1)
    if good.all():  # the common block: every window counts all its pixels
        counts = np.broadcast_to(w.sum(axis=0), (f.shape[0], w.shape[1]))
    else:
        f[~good] = 0.0
        counts = good.astype(np.float64) @ w
    sums = (f @ w).reshape(f.shape[0], *win.shape[:2])
    counts = counts.reshape(f.shape[0], *win.shape[:2])
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts
        cont = 0.5 * (means[:, :, 1] + means[:, :, 2])
        out = 1.0 - means[:, :, 0] / cont
    out[~(np.isfinite(out) & (cont > 0))] = np.nan
    return out
