"""LAPACK's two-stage tridiagonal reduction, called through :mod:`ctypes`.

The one-stage reduction ``?sytrd`` spends half its flops in matrix-vector
products (BLAS 2): at P = 4096 it runs at a fraction of the cores' speed. The
two-stage form (Haidar, Ltaief & Dongarra 2011; LAPACK 3.7) first reduces the
matrix to a band of width ``kd`` with blocked Householder transformations
(``?sytrd_sy2sb``, BLAS 3), then chases the band down to tridiagonal
(``?sytrd_sb2st``, O(P^2 kd), on one core). Alone on two BLAS threads it is
no faster than the blocked ``?sytrd`` here (1.3-1.7 s against 1.4-1.7 s at
P = 4096, float32); its gain is that two of them run at once, one thread each,
at 1.0-1.4 s per reduction, where two ``?sytrd`` at once contend for memory
(2.8-3.2 s per reduction). The expert solves run that way
(``benchmarks/expert_solves.py`` measures every layout in the same run).

SciPy wraps neither routine (not in :mod:`scipy.linalg.lapack`, nor in the
Cython API), but the LAPACK that SciPy links exports both. They are looked up
by the name SciPy's own ``?sytrd`` has in that library (``scipy_ssytrd_`` in
the wheels' OpenBLAS, ``ssytrd_`` in a system LAPACK), through the handle of
:mod:`scipy.linalg.cython_lapack`, whose dependencies hold exactly that
library. A first call on a small matrix is checked against
:func:`numpy.linalg.eigvalsh`; if a routine is missing or the check fails,
:data:`AVAILABLE` is False and callers use ``?sytrd``.

Only the stage-one reflectors are kept (``Q1``, stored as a QR factorisation
below the ``kd``-th subdiagonal): the band ``B = Q1^T G Q1`` and the
tridiagonal ``T`` (``B``'s eigenvalues) are all :mod:`snrmoe_dask.ridge` needs
to score a Ridge penalty grid.
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np

__all__ = ["AVAILABLE", "band_reduce", "band_to_tridiagonal"]

_PREFIX = {np.dtype(np.float32): "s", np.dtype(np.float64): "d"}


def _library():
    try:
        from scipy.linalg import cython_lapack
        return ctypes.CDLL(cython_lapack.__file__)
    except (ImportError, OSError, AttributeError):  # pragma: no cover - depends on the SciPy build
        return None


def _symbol(lib, routine: str):
    """``routine`` in the naming convention under which ``lib`` resolves ``?sytrd`` (prefix and underscore)."""
    for prefix in ("scipy_", ""):
        for suffix in ("_", ""):
            try:
                getattr(lib, f"{prefix}{routine[0]}sytrd{suffix}")
                return getattr(lib, f"{prefix}{routine}{suffix}")
            except AttributeError:
                continue
    return None


@functools.cache
def _routines(prefix: str):
    """``(sy2sb, sb2st)`` as ctypes functions for ``prefix`` ('s' or 'd'), or None."""
    lib = _library()
    if lib is None:  # pragma: no cover
        return None
    sy2sb, sb2st = _symbol(lib, f"{prefix}sytrd_sy2sb"), _symbol(lib, f"{prefix}sytrd_sb2st")
    if sy2sb is None or sb2st is None:  # pragma: no cover - an older LAPACK
        return None
    p_int, ptr, p_char, strlen = ctypes.POINTER(ctypes.c_int), ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
    # Fortran ABI: every argument by pointer, 32-bit integers (SciPy's LAPACK is LP64), one hidden length per string
    # UPLO, N, KD, A, LDA, AB, LDAB, TAU, WORK, LWORK, INFO
    sy2sb.argtypes = [p_char, p_int, p_int, ptr, p_int, ptr, p_int, ptr, ptr, p_int, p_int, strlen]
    # STAGE1, VECT, UPLO, N, KD, AB, LDAB, D, E, HOUS, LHOUS, WORK, LWORK, INFO
    sb2st.argtypes = [p_char, p_char, p_char, p_int, p_int, ptr, p_int, ptr, ptr, ptr, p_int, ptr, p_int, p_int,
                      strlen, strlen, strlen]
    sy2sb.restype = sb2st.restype = None
    return sy2sb, sb2st


def _int(v: int):
    return ctypes.byref(ctypes.c_int(int(v)))


def band_reduce(work: np.ndarray, kd: int) -> tuple[np.ndarray, np.ndarray]:
    """Reduce the symmetric matrix in ``work``'s lower triangle (Fortran order) to a band of width ``kd``.

    ``work`` is overwritten: below its ``kd``-th subdiagonal it holds the
    Householder vectors of ``Q1 = H(1) ... H(P - kd)`` (as a QR factorisation
    of ``work[kd:, :P - kd]`` stores them), with ``tau``. Returns
    ``(band, tau)``: ``band`` of shape ``(kd + 1, P)`` in LAPACK's lower band
    storage (``band[i - j, j] = B[i, j]``), ``B = Q1^T G Q1``.
    """
    sy2sb = _routines(_PREFIX[work.dtype])[0]
    n = work.shape[0]
    if work.shape != (n, n) or not work.flags.f_contiguous or not 0 < kd < n:
        raise ValueError(f"band_reduce needs a square Fortran-ordered matrix and 0 < kd < P, got {work.shape}, kd={kd}")
    band = np.zeros((kd + 1, n), work.dtype, order="F")
    tau = np.zeros(n - kd, work.dtype)  # for P <= kd + 1 LAPACK copies the band and leaves TAU unset: Q = I
    info, query = ctypes.c_int(0), np.zeros(1, work.dtype)
    args = (b"L", _int(n), _int(kd), work.ctypes.data, _int(n), band.ctypes.data, _int(kd + 1), tau.ctypes.data)
    sy2sb(*args, query.ctypes.data, _int(-1), ctypes.byref(info), 1)
    lwork = max(1, int(query[0]))
    scratch = np.empty(lwork, work.dtype)
    sy2sb(*args, scratch.ctypes.data, _int(lwork), ctypes.byref(info), 1)
    if info.value != 0:  # pragma: no cover - LAPACK reports an illegal argument only
        raise np.linalg.LinAlgError(f"?sytrd_sy2sb failed (info={info.value})")
    return band, tau


def band_to_tridiagonal(band: np.ndarray, kd: int) -> tuple[np.ndarray, np.ndarray]:
    """The tridiagonal form ``(diag, offdiag)`` of the lower band matrix ``band`` (not modified), no vectors."""
    sb2st = _routines(_PREFIX[band.dtype])[1]
    n = band.shape[1]
    ab = np.array(band, order="F", copy=True)  # sb2st overwrites it
    d, e = np.empty(n, band.dtype), np.empty(max(n - 1, 0), band.dtype)
    info, hq, wq = ctypes.c_int(0), np.zeros(1, band.dtype), np.zeros(1, band.dtype)
    head = (b"Y", b"N", b"L", _int(n), _int(kd), ab.ctypes.data, _int(kd + 1), d.ctypes.data, e.ctypes.data)
    sb2st(*head, hq.ctypes.data, _int(-1), wq.ctypes.data, _int(-1), ctypes.byref(info), 1, 1, 1)
    hous, work = np.empty(max(1, int(hq[0])), band.dtype), np.empty(max(1, int(wq[0])), band.dtype)
    sb2st(*head, hous.ctypes.data, _int(hous.size), work.ctypes.data, _int(work.size), ctypes.byref(info), 1, 1, 1)
    if info.value != 0:  # pragma: no cover - LAPACK reports an illegal argument only
        raise np.linalg.LinAlgError(f"?sytrd_sb2st failed (info={info.value})")
    return d, e


def _self_check() -> bool:
    """Both precisions found and right on a small matrix (a wrong ABI would give garbage, not an error)."""
    try:
        if any(_routines(p) is None for p in ("s", "d")):
            return False
        rng = np.random.default_rng(0)
        x = rng.standard_normal((24, 40))
        g = x @ x.T
        for dtype in (np.float32, np.float64):
            work = np.asfortranarray(g.astype(dtype))
            band, _ = band_reduce(work, 4)
            d, e = band_to_tridiagonal(band, 4)
            t = np.diag(d.astype(np.float64)) + np.diag(e.astype(np.float64), 1) + np.diag(e.astype(np.float64), -1)
            if not np.allclose(np.linalg.eigvalsh(t), np.linalg.eigvalsh(g), rtol=0, atol=1e-4 * np.abs(g).max()):
                return False
        return True
    except Exception:  # pragma: no cover - any failure of the foreign call means: do not use it
        return False


AVAILABLE: bool = _self_check()
"""True when the two-stage reduction was found and passed its check (else ``?sytrd`` is used)."""
