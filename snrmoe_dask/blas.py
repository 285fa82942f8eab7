"""Rank-k updates ``C <- C + A^T A`` that release the GIL.

``scipy.linalg.blas.ssyrk`` is an f2py wrapper that holds the GIL for the
whole BLAS call. In the one pass a fold's ``syrk`` is most of a chain's time,
so while it ran no other task of the worker (chunk reads, features) could
execute Python, and the two cores took turns instead of working together.

SciPy's stable Cython BLAS API (:mod:`scipy.linalg.cython_blas`) exports the
same routines as C function pointers (``__pyx_capi__``); calling one through
:mod:`ctypes` releases the GIL for the duration of the call, as any ctypes
foreign call does. It is the BLAS that SciPy itself links (OpenBLAS, MKL,
Accelerate), so results equal the f2py wrapper's. If the capsule is missing or
its C signature is not the one expected, :func:`syrk_update` falls back to
the f2py wrapper (same result, GIL held) and :data:`GIL_FREE` says so.

With ``pieces > 1`` the update is cut into column panels of equal area
(a ``gemm`` above each panel's diagonal block, a ``syrk`` on it) that run
at once on a small thread pool, each on one BLAS thread. A fold of the pass
then uses every core of the worker without a multithreaded BLAS call, whose
threads wait for each other whenever the worker's reading thread takes a
core (2 cores: a 1,024-row update 157 ms on one thread, 164 ms on two BLAS
threads beside a busy process, 117 ms as two pieces).
"""

from __future__ import annotations

import ctypes
import importlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import threadpoolctl
from scipy.linalg import blas as _f2py_blas
from scipy.linalg import lapack as _f2py_lapack
from threadpoolctl import threadpool_limits

__all__ = ["CHOLESKY_BLOCK", "GIL_FREE", "blas_threads", "cholesky_upper", "panel_bounds", "syrk_update"]

_C_TYPES = {"s": ctypes.c_float, "d": ctypes.c_double}


def _capsule(name: str, module: str = "cython_blas"):
    """``(capsule, its C signature)`` of ``scipy.linalg.<module>``'s ``name``, or None."""
    try:
        capsule = importlib.import_module(f"scipy.linalg.{module}").__pyx_capi__[name]
    except (ImportError, AttributeError, KeyError):  # pragma: no cover - depends on the SciPy build
        return None
    # private prototypes: setting restype/argtypes on ctypes.pythonapi's shared attributes would change them
    # for every other user in the process
    get_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))
    name = get_name(capsule)
    return None if name is None else (capsule, name)


def _pointer(capsule, name: bytes):
    get_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
        ("PyCapsule_GetPointer", ctypes.pythonapi))
    return get_pointer(capsule, name)


def _capi(name: str, args: str, module: str = "cython_blas"):
    """``name``'s function pointer from ``scipy.linalg.<module>`` (cython_blas or cython_lapack), or None.

    ``args`` spells the Fortran ABI, every argument by pointer: ``c`` a character, ``i`` a 32-bit integer,
    ``s`` a scalar and ``a`` an array of the routine's real type (its prefix). The pointer is returned only if
    the capsule's C signature is exactly that one.
    """
    found = _capsule(name, module)
    real = f"__pyx_t_5scipy_6linalg_{len(module)}{module}_{name[0]}"  # Cython's name for the module's real type
    c_names = {"c": "char *", "i": "int *", "s": f"{real} *", "a": f"{real} *"}
    if found is None or found[1].decode() != f"void ({', '.join(c_names[k] for k in args)})":
        return None  # pragma: no cover - another ABI: the callers fall back to the f2py wrappers
    scalar = ctypes.POINTER(_C_TYPES[name[0]])
    types = {"c": ctypes.c_char_p, "i": ctypes.POINTER(ctypes.c_int), "s": scalar, "a": ctypes.c_void_p}
    return ctypes.CFUNCTYPE(None, *(types[k] for k in args))(_pointer(*found))


#: uplo, trans, n, k, alpha, a, lda, beta, c, ldc
_SYRK_ARGS = "cciisaisai"
#: transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc
_GEMM_ARGS = "cciiisaiaisai"
#: side, uplo, transa, diag, m, n, alpha, a, lda, b, ldb
_TRSM_ARGS = "cccciisaiai"
#: uplo, n, a, lda, info
_POTRF_ARGS = "ciaii"


_REALS = (("s", np.float32), ("d", np.float64))
_SYRK = {np.dtype(t): _capi(f"{p}syrk", _SYRK_ARGS) for p, t in _REALS}
_GEMM = {np.dtype(t): _capi(f"{p}gemm", _GEMM_ARGS) for p, t in _REALS}
_TRSM = {np.dtype(t): _capi(f"{p}trsm", _TRSM_ARGS) for p, t in _REALS}
_POTRF = {np.dtype(t): _capi(f"{p}potrf", _POTRF_ARGS, "cython_lapack") for p, t in _REALS}
_F2PY = {np.dtype(np.float32): _f2py_blas.ssyrk, np.dtype(np.float64): _f2py_blas.dsyrk}
GIL_FREE: bool = all(f is not None for f in _SYRK.values())
"""True when :func:`syrk_update` runs without holding the GIL."""

_INT_MAX = 2**31 - 1


def panel_bounds(p: int, pieces: int) -> list[int]:
    """Column bounds ``[0, ..., p]`` of ``pieces`` panels of the upper triangle with about equal area."""
    pieces = max(1, min(int(pieces), p))
    # panel j ends where the triangle up to it holds j / pieces of the area: c ~ p sqrt(j / pieces)
    cuts = [int(round(p * np.sqrt(j / pieces))) for j in range(pieces + 1)]
    return sorted(set(cuts))


_POOL_LOCK = threading.Lock()
_POOL: list = [None, 0]  # the executor and its size


def _pool(workers: int) -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if _POOL[0] is None or _POOL[1] < workers:
            old = _POOL[0]
            _POOL[0], _POOL[1] = ThreadPoolExecutor(workers, thread_name_prefix="snrmoe-blas"), workers
            if old is not None:
                old.shutdown(wait=False)
        return _POOL[0]


def syrk_update(c: np.ndarray, a: np.ndarray, beta: float = 1.0, pieces: int = 1) -> np.ndarray:
    """``c <- beta c + a.T @ a`` on the upper triangle of Fortran-ordered ``c``, in place.

    Parameters
    ----------
    c : ndarray of shape (p, p), Fortran-contiguous, float32 or float64
        Updated in place. Seen as the C-ordered array ``c.T``, the update lands
        in the *lower* triangle; the other triangle is not touched.
    a : ndarray of shape (m, p), C-contiguous, same dtype as ``c``
        The rows to add (``m`` may be 0).
    beta : float
        1 adds to ``c``; 0 overwrites its triangle (no need to zero it first).
    pieces : int
        Column panels of equal area computed at once, one BLAS call each, on
        :func:`panel_bounds` (the caller's thread takes one). Each BLAS call
        runs with the library's current thread count: call it with one BLAS
        thread (``threadpoolctl``) so that the pieces are the parallelism.
        The result is deterministic for a given ``pieces``.

    Returns
    -------
    c
    """
    if c.ndim != 2 or c.shape[0] != c.shape[1] or not c.flags.f_contiguous or not c.flags.writeable:
        raise ValueError(f"c must be a writeable square Fortran-ordered matrix, got shape {c.shape}")
    if a.ndim != 2 or a.shape[1] != c.shape[0] or not a.flags.c_contiguous:
        raise ValueError(f"a must be a C-ordered (m, {c.shape[0]}) matrix, got shape {a.shape}")
    if a.dtype != c.dtype or c.dtype not in _SYRK:
        raise ValueError(f"a and c must share a float32 or float64 dtype, got {a.dtype} and {c.dtype}")
    if int(pieces) < 1:
        raise ValueError(f"pieces must be at least 1, got {pieces}")
    m, p = a.shape
    if m == 0:
        if beta == 0.0:
            c[...] = 0.0
        return c
    if max(m, p) > _INT_MAX:  # pragma: no cover - 32-bit BLAS integers
        raise ValueError(f"matrix too large for 32-bit BLAS: {a.shape}")
    fn = _SYRK[c.dtype]
    if fn is None:  # SciPy builds without the Cython BLAS capsule (tested by patching it away)
        out = _F2PY[c.dtype](1.0, a.T, beta=float(beta), c=c, trans=0, lower=0, overwrite_c=1)
        if not np.shares_memory(out, c):
            c[...] = out
        return c
    bounds = panel_bounds(p, pieces) if _GEMM[c.dtype] is not None else [0, p]
    if len(bounds) <= 2:
        _panel(c, a, beta, 0, p)
        return c
    jobs = [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    futures = [_pool(len(jobs) - 1).submit(_panel, c, a, beta, lo, hi) for lo, hi in jobs[1:]]
    try:
        _panel(c, a, beta, *jobs[0])
    finally:
        for f in futures:
            f.result()
    return c


def _panel(c: np.ndarray, a: np.ndarray, beta: float, lo: int, hi: int) -> None:
    """Columns ``lo:hi`` of the upper triangle of ``c <- beta c + A A^T`` (``A = a.T``, Fortran (p, m)):
    ``C[:lo, lo:hi]`` by ``gemm`` and the diagonal block ``C[lo:hi, lo:hi]`` by ``syrk``. GIL-free."""
    m, p = a.shape
    real = _C_TYPES["s" if c.dtype == np.float32 else "d"]
    item = c.dtype.itemsize
    ld, k_ = ctypes.c_int(p), ctypes.c_int(m)
    one, b_ = real(1.0), real(beta)
    width = ctypes.c_int(hi - lo)
    if lo > 0:  # C[:lo, lo:hi] = A[:lo] A[lo:hi]^T: rows of A are columns of a, so A[r:] starts at a + r
        rows = ctypes.c_int(lo)
        _GEMM[c.dtype](b"N", b"T", ctypes.byref(rows), ctypes.byref(width), ctypes.byref(k_), ctypes.byref(one),
                       a.ctypes.data, ctypes.byref(ld), a.ctypes.data + lo * item, ctypes.byref(ld),
                       ctypes.byref(b_), c.ctypes.data + lo * p * item, ctypes.byref(ld))
    # a.T is the Fortran-ordered (p, m) matrix A: C <- 1 * A A^T + beta * C, i.e. trans = "N", k = m, lda = p
    _SYRK[c.dtype](b"U", b"N", ctypes.byref(width), ctypes.byref(k_), ctypes.byref(one), a.ctypes.data + lo * item,
                   ctypes.byref(ld), ctypes.byref(b_), c.ctypes.data + (lo * p + lo) * item, ctypes.byref(ld))


#: rows of a block of :func:`cholesky_upper`: P = 4096, one BLAS thread: 0.58-0.77 s with 256 or 512, 0.74 s with 128
CHOLESKY_BLOCK = 256


def cholesky_upper(c: np.ndarray, block: int = CHOLESKY_BLOCK) -> int:
    """Cholesky factor ``U`` (``c = U^T U``) of the upper triangle of Fortran-ordered ``c``, in place. GIL-free.

    LAPACK's blocked algorithm (reference ``?potrf``, upper, left-looking): per block of ``block`` rows a
    ``?syrk`` and a ``?gemm`` bring in the rows above, ``?potrf`` factors the diagonal block and ``?trsm``
    the rest of its rows. OpenBLAS replaces ``?potrf`` by its own routine, which is faster alone (P = 4096,
    one BLAS thread: 0.49-0.50 s against 0.62-0.77 s) but does not run two calls side by side: two at once,
    one BLAS thread each, took 0.96-1.03 s per pair against 0.62-0.86 s with this (measured, not traced;
    ``benchmarks/expert_solves.py`` prints both). The solves run two at a time. Only the diagonal
    blocks go through ``?potrf``. The other triangle is neither read nor written.

    Returns LAPACK's ``info``: 0, or the order of the first leading minor that is not positive definite
    (``c`` is then spoiled). Without the Cython capsules, SciPy's f2py ``?potrf`` does the work.
    """
    if c.ndim != 2 or c.shape[0] != c.shape[1] or not c.flags.f_contiguous or not c.flags.writeable:
        raise ValueError(f"c must be a writeable square Fortran-ordered matrix, got shape {c.shape}")
    if c.dtype not in _POTRF:
        raise ValueError(f"c must be float32 or float64, got {c.dtype}")
    n, block = c.shape[0], int(block)
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    if n > _INT_MAX:  # pragma: no cover - 32-bit BLAS integers
        raise ValueError(f"matrix too large for 32-bit BLAS: {c.shape}")
    syrk, gemm, trsm, potrf = (f[c.dtype] for f in (_SYRK, _GEMM, _TRSM, _POTRF))
    if None in (syrk, gemm, trsm, potrf):  # the f2py wrapper, in place (GIL held)
        out, info = _f2py_lapack.get_lapack_funcs("potrf", dtype=c.dtype)(c, lower=0, clean=0, overwrite_a=1)
        if not np.shares_memory(out, c):  # pragma: no cover - f2py copies only a non-Fortran array
            c[...] = out
        return int(info)
    real, item = _C_TYPES["s" if c.dtype == np.float32 else "d"], c.dtype.itemsize
    base, ld, one, minus = c.ctypes.data, ctypes.byref(ctypes.c_int(n)), real(1.0), real(-1.0)
    info = ctypes.c_int(0)

    def at(row: int, col: int) -> int:
        return base + (row + col * n) * item

    for j in range(0, n, block):
        jb, rest = min(block, n - j), max(n - j - block, 0)
        width, above, right = ctypes.c_int(jb), ctypes.c_int(j), ctypes.c_int(rest)
        if j:  # the diagonal block minus the rows above it
            syrk(b"U", b"T", ctypes.byref(width), ctypes.byref(above), ctypes.byref(minus), at(0, j), ld,
                 ctypes.byref(one), at(j, j), ld)
        potrf(b"U", ctypes.byref(width), at(j, j), ld, ctypes.byref(info))
        if info.value:
            return j + info.value
        if rest:
            if j:  # the block's rows right of the diagonal minus the rows above them
                gemm(b"T", b"N", ctypes.byref(width), ctypes.byref(right), ctypes.byref(above), ctypes.byref(minus),
                     at(0, j), ld, at(0, j + jb), ld, ctypes.byref(one), at(j, j + jb), ld)
            trsm(b"L", b"U", b"T", b"N", ctypes.byref(width), ctypes.byref(right), ctypes.byref(one), at(j, j), ld,
                 at(j, j + jb), ld)
    return 0


def _take_control() -> None:
    """Let this Python thread change OpenBLAS's thread count.

    threadpoolctl 3.8 hands OpenBLAS (pthreads) to the first Python thread that sets a limit and ignores,
    silently, the settings of every other thread: a solve on the other thread of a worker then ran on two
    BLAS threads where it asked for one, and its last bits depended on which thread ran it (measured:
    two runs of one fit differed in 6 of 29 hierarchical priors). :func:`blas_threads` orders the changes
    itself (under its lock), so the thread making one takes control first.
    """
    controller = getattr(threadpoolctl, "OpenBLASController", None)
    clear = getattr(controller, "clear_controlling_thread", None)  # threadpoolctl >= 3.8
    if clear is not None:
        clear(force=True)


class _Level:
    """One setting of the process's BLAS thread count, shared by every task inside it."""

    def __init__(self, threads: int, holders: int):
        self.threads, self.holders = threads, holders
        _take_control()
        self.control = threadpool_limits(limits=threads, user_api="blas")

    def restore(self) -> None:
        _take_control()  # the last task out may run on another thread than the first one in
        self.control.restore_original_limits()


_LIMIT = threading.Condition()
_LEVELS: list[_Level] = []  # the innermost setting last
_DEPTH = threading.local()  # how many times this thread is inside blas_threads


@contextmanager
def blas_threads(threads: int | None) -> Iterator[None]:
    """Run a block with ``threads`` BLAS threads in this process, beside other tasks that do the same.

    threadpoolctl sets the thread count for the whole process and restores it on exit. Two tasks of one worker
    that each set and restore it (two solves at once) undo each other's setting in the middle of a call, and a
    Cholesky factor computed on one or on two BLAS threads differs in its last bits (measured), so results
    depended on timing. Here the first task in sets the count and the last one out restores it; tasks asking for
    the same count share the setting, a task asking for another waits until the others are out. A thread that is
    already inside may change the count for a nested block only while no other thread is inside (waiting there
    could wait for itself: that is an error, not a hang). ``None`` leaves the count as it is.
    """
    if threads is None:
        yield
        return
    depth = getattr(_DEPTH, "n", 0)
    with _LIMIT:
        while _LEVELS and _LEVELS[-1].threads != threads and sum(lv.holders for lv in _LEVELS) > depth:
            if depth:
                raise RuntimeError(f"a block asks for {threads} BLAS thread(s) inside one that shares "
                                   f"{_LEVELS[-1].threads} with other tasks")
            _LIMIT.wait()
        if _LEVELS and _LEVELS[-1].threads == threads:
            level = _LEVELS[-1]
            level.holders += 1
        else:
            level = _Level(threads, 1)
            _LEVELS.append(level)
        _DEPTH.n = depth + 1
    try:
        yield
    finally:
        with _LIMIT:
            _DEPTH.n = depth
            level.holders -= 1
            while _LEVELS and _LEVELS[-1].holders == 0:
                _LEVELS.pop().restore()
            _LIMIT.notify_all()
