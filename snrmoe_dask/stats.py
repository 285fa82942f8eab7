"""Additive sufficient statistics per cell, and the NumPy kernels that build them.

For the rows ``x`` (flux vectors) and targets ``y`` (logg) of each cell ``k``::

    n[k], sx[k] = sum(x - c), sy[k] = sum(y), syy[k] = sum(y^2),
    xtx[k] = sum((x - c)(x - c)^T), xty[k] = sum((x - c) y)

``c = c[k]`` is a fixed *shift* per cell, close to the cell's mean spectrum
(the mean of its rows in the pass's first block). The shift removes most of
the cancellation that uncentred float32 sums would suffer from (flux ~ 100
counts with per-pixel scatter ~ 10, and bright and faint cells whose means
differ by several times that scatter): the remaining error is that of
float32 products of nearly centred data, added into float64 accumulators at
every flush. Experts that span several cells combine the cells' centred
Gram matrices with the between-cell scatter (the parallel-axis rule), in
float64.

:class:`SufficientStats` is a value: ``a + b`` is the statistics of the union
(shifts are reconciled exactly), it saves to and loads from zarr, and
:meth:`SufficientStats.centered` hands a solver the centred quantities.

:class:`CellAccumulator` is the streaming kernel: rows are appended to
per-cell float32 buffers and folded in with one BLAS ``syrk`` per
``flush_rows`` rows, so the GEMMs stay large whatever the cell mix of a block.

Each cell's Gram matrix is kept **packed**: its lower triangle, row by row,
``P (P + 1) / 2`` float64 numbers (row ``i`` holds ``xtx[i, :i + 1]`` at
offset ``i (i + 1) / 2``). A flush's ``syrk`` lands in one full-storage
scratch matrix per accumulator and is added into the packed total at once,
so no cell ever holds a full ``P x P`` matrix: the totals of 36 cells of
4096 pixels take 36 x 8,390,656 x 8 B = 2.4 GB, in memory and on disk.
"""

from __future__ import annotations

import json
import threading
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy.linalg.blas import dspmv as _dspmv
from scipy.linalg.blas import dsyrk as _dsyrk

from .blas import syrk_update
from .zarrstore import consolidate

__all__ = ["SufficientStats", "CellAccumulator", "FlushBuffers", "CenteredStats", "Scratch", "process_scratch",
           "clear_process_scratch", "impute_bad_pixels", "memory_bytes", "symmetrize_lower", "tri_size", "pack_lower",
           "unpack_lower", "unpack_symmetric", "packed_quadratic"]


# ---------------------------------------------------------------- packed triangles
class Scratch:
    """Square buffers a thread reuses from one solve to the next.

    A fresh 4096 x 4096 float64 array costs 0.1-0.2 s of page faults here,
    as much as its Cholesky factorisation; an expert's solve used to allocate
    six of them. Buffers are kept by name, shape and dtype; whatever a solve
    builds in them (a Gram matrix, a factor) is valid until the next call
    that takes the same buffer. :func:`process_scratch` lends one of the
    process's sets.
    """

    def __init__(self):
        self._bufs: dict = {}

    def take(self, name: str, shape: tuple[int, ...], dtype, order: str = "C") -> np.ndarray:
        key = (name, tuple(shape), np.dtype(dtype).str, order)
        buf = self._bufs.get(key)
        if buf is None:
            buf = self._bufs[key] = np.empty(shape, dtype, order=order)
        return buf

    def clear(self) -> None:
        self._bufs.clear()

    def __len__(self) -> int:
        """Buffers held."""
        return len(self._bufs)


_FREE_SCRATCH: list[Scratch] = []  # the process's sets not lent at the moment
_SCRATCH_LOCK = threading.Lock()


@contextmanager
def process_scratch():
    """Lend one of the process's :class:`Scratch` sets for a whole solve: a free one, or a new one if every
    set is lent. Solves that run one after another reuse one set; solves that run at once (one per thread)
    each hold their own, so a worker keeps as many sets as it ever ran solves at once."""
    with _SCRATCH_LOCK:
        scratch = _FREE_SCRATCH.pop() if _FREE_SCRATCH else Scratch()
    try:
        yield scratch
    finally:
        with _SCRATCH_LOCK:
            _FREE_SCRATCH.append(scratch)


def clear_process_scratch() -> int:
    """Drop the buffers of every set not lent at the moment (a stage is over); returns how many were dropped."""
    with _SCRATCH_LOCK:
        dropped = sum(len(s) for s in _FREE_SCRATCH)
        _FREE_SCRATCH.clear()
    return dropped


def tri_size(p: int) -> int:
    """Length of a packed lower triangle of a ``p x p`` matrix."""
    return p * (p + 1) // 2


@lru_cache(maxsize=8)
def _offsets(p: int) -> np.ndarray:
    return np.concatenate(([0], np.cumsum(np.arange(1, p + 1, dtype=np.int64))))


def _side(packed_len: int) -> int:
    p = int((np.sqrt(8 * packed_len + 1) - 1) // 2)
    if tri_size(p) != packed_len:
        raise ValueError(f"{packed_len} is not the length of a packed triangle")
    return p


_PACK_BAND = 64  # rows of a narrower-dtype triangle staged at once (64 x 4096 float32: 1 MB, cache-resident)


def pack_lower(m: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``out += lower triangle of m`` (``out`` float64, new zeros if None).

    ``m`` is a C-ordered square matrix whose lower triangle holds the data
    (the upper one is not read), of any float dtype. A float64 ``m`` is added
    row by row. A narrower one (a flush's float32 products) is staged
    :data:`_PACK_BAND` rows at a time in its own dtype (plain copies into a
    small buffer), then added to the band's contiguous stretch of ``out`` in
    one widening ``np.add``: the same float64 sums as row by row, with one
    mixed-dtype loop per band instead of per row (measured at P = 4096:
    -15 to -30 %, on a memory-bound step).
    """
    p = m.shape[0]
    off = _offsets(p)
    out = np.zeros(tri_size(p)) if out is None else out
    if m.dtype == out.dtype:
        for i in range(p):
            out[off[i]:off[i + 1]] += m[i, :i + 1]
        return out
    stage = np.empty(_PACK_BAND * p, m.dtype)
    for lo in range(0, p, _PACK_BAND):
        hi = min(p, lo + _PACK_BAND)
        base = off[lo]
        for i in range(lo, hi):
            stage[off[i] - base:off[i + 1] - base] = m[i, :i + 1]
        seg = out[base:off[hi]]
        np.add(seg, stage[:off[hi] - base], out=seg)
    return out


def unpack_lower(packed: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """A C-ordered float64 matrix whose lower triangle is the packed one (the upper one is left as it was).

    One slice copy per row: each packed row is contiguous in both arrays, so this is a memcpy of the
    triangle, 14 ms at P = 4096 here, against 47-56 ms for one ``np.put`` through a flat index.
    """
    p = _side(packed.shape[-1])
    m = np.empty((p, p)) if out is None else out
    if not m.flags.c_contiguous or m.shape != (p, p):
        raise ValueError(f"out must be a C-contiguous ({p}, {p}) matrix")
    off = _offsets(p)
    for i in range(p):
        m[i, :i + 1] = packed[off[i]:off[i + 1]]
    return m


def unpack_symmetric(packed: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The full symmetric float64 matrix of a packed lower triangle."""
    return symmetrize_lower(unpack_lower(packed, out))


def packed_quadratic(packed: np.ndarray, w: np.ndarray) -> float:
    """``w^T M w`` for the symmetric ``M`` of a packed lower triangle, without unpacking it.

    The packed rows of a lower triangle are BLAS's packed columns of an upper one, so one ``dspmv``
    (``uplo = U``) reads the 67 MB triangle once: 9 ms at P = 4096 here, against 0.15-0.30 s for
    :func:`unpack_symmetric` (a new P x P array) and a matrix-vector product.
    """
    w = np.ascontiguousarray(w, np.float64)
    p = _side(packed.shape[-1])
    if w.shape != (p,):
        raise ValueError(f"w must have shape ({p},), got {w.shape}")
    return float(w @ _dspmv(p, 1.0, np.ascontiguousarray(packed, np.float64), w, lower=0))


def _packed_sym_outer_add(packed: np.ndarray, h: np.ndarray, d: np.ndarray) -> None:
    """``packed += lower(h d^T + d h^T)`` in place."""
    off = _offsets(h.shape[0])
    for i in range(h.shape[0]):
        packed[off[i]:off[i + 1]] += h[i] * d[:i + 1] + d[i] * h[:i + 1]


@dataclass(frozen=True)
class CenteredStats:
    """Centred quantities of one expert's rows (float64).

    ``gram`` = sum (x - xbar)(x - xbar)^T, ``xty`` = sum (x - xbar)(y - ybar),
    ``yy`` = sum (y - ybar)^2.
    """

    n: float
    xbar: np.ndarray
    ybar: float
    gram: np.ndarray
    xty: np.ndarray
    yy: float


@dataclass
class SufficientStats:
    """Per-cell sufficient statistics; a value type (add, save, load).

    Attributes
    ----------
    n : ndarray of shape (K,)
    sx, xty : ndarray of shape (K, P)
    sy, syy : ndarray of shape (K,)
    xtx : ndarray of shape (K, P (P + 1) / 2)
        Each cell's Gram matrix, packed lower triangle (:func:`pack_lower`).
    shift : ndarray of shape (K, P)
        Per-cell shift (a shape (P,) shift given to the constructor is shared by every cell).
    meta : dict
        JSON-able description (cell layout, bin edges, source); kept from the
        left operand on addition.
    """

    n: np.ndarray
    sx: np.ndarray
    sy: np.ndarray
    syy: np.ndarray
    xtx: np.ndarray
    xty: np.ndarray
    shift: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        shift = np.asarray(self.shift, np.float64)
        if shift.ndim == 1:  # one shift shared by every cell
            shift = np.broadcast_to(shift, (self.n.shape[0], shift.shape[0])).copy()
        if shift.shape != self.sx.shape:
            raise ValueError(f"shift must have shape (P,) or {self.sx.shape}, got {shift.shape}")
        if self.xtx.shape != (self.sx.shape[0], tri_size(self.sx.shape[1])):
            raise ValueError(f"xtx must be packed, shape {(self.sx.shape[0], tri_size(self.sx.shape[1]))}; "
                             f"got {self.xtx.shape}")
        self.shift = shift

    @property
    def n_cells(self) -> int:
        return int(self.n.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.shift.shape[1])

    @classmethod
    def zeros(cls, n_cells: int, shift: np.ndarray, meta: dict | None = None) -> SufficientStats:
        """Empty statistics; ``shift`` of shape (P,) (shared) or (n_cells, P)."""
        p = np.shape(shift)[-1]
        return cls(np.zeros(n_cells), np.zeros((n_cells, p)), np.zeros(n_cells), np.zeros(n_cells),
                   np.zeros((n_cells, tri_size(p))), np.zeros((n_cells, p)), np.array(shift, np.float64),
                   dict(meta or {}))

    # ---------------------------------------------------------- algebra
    def reshift_(self, shift: np.ndarray) -> SufficientStats:
        """Move the statistics to another shift (shape (P,) or (K, P)) in place, exactly; returns self.

        ``x - c' = (x - c) + d`` with ``d = c - c'``, per cell:
        ``xtx += (sx + n d / 2) d^T + d (sx + n d / 2)^T``, ``sx += n d``,
        ``xty += sy d``. Only cells whose shift changes are touched.
        """
        new = np.broadcast_to(np.asarray(shift, np.float64), self.shift.shape)
        for k in range(self.n_cells):
            d = self.shift[k] - new[k]
            if not d.any():
                continue
            if self.n[k]:
                _packed_sym_outer_add(self.xtx[k], self.sx[k] + 0.5 * self.n[k] * d, d)
                self.sx[k] += self.n[k] * d
                self.xty[k] += self.sy[k] * d
            self.shift[k] = new[k]
        return self

    def reshift(self, shift: np.ndarray) -> SufficientStats:
        """The same statistics about another shift (exact algebra, new object)."""
        copy = SufficientStats(self.n.copy(), self.sx.copy(), self.sy.copy(), self.syy.copy(), self.xtx.copy(),
                               self.xty.copy(), self.shift.copy(), dict(self.meta))
        return copy.reshift_(shift)

    def __add__(self, other: SufficientStats) -> SufficientStats:
        if not isinstance(other, SufficientStats):
            return NotImplemented
        if other.xtx.shape != self.xtx.shape:
            raise ValueError(f"cannot add statistics of shapes {self.xtx.shape} and {other.xtx.shape}")
        if not np.array_equal(other.shift, self.shift):
            other = other.reshift(self.shift)
        return SufficientStats(self.n + other.n, self.sx + other.sx, self.sy + other.sy, self.syy + other.syy,
                               self.xtx + other.xtx, self.xty + other.xty, self.shift.copy(), dict(self.meta))

    def iadd(self, other: SufficientStats) -> SufficientStats:
        """In-place ``self += other``; ``other`` is moved to ``self``'s shifts in place (no new (K, P, P) array)."""
        if other.xtx.shape != self.xtx.shape:
            raise ValueError(f"cannot add statistics of shapes {self.xtx.shape} and {other.xtx.shape}")
        if not np.array_equal(other.shift, self.shift):
            other.reshift_(self.shift)
        for name in ("n", "sx", "sy", "syy", "xtx", "xty"):
            getattr(self, name).__iadd__(getattr(other, name))
        return self

    def cells(self, index: Sequence[int] | np.ndarray, scratch: Scratch | None = None,
              name: str = "gram", same_gram: CenteredStats | None = None, lower_only: bool = False) -> CenteredStats:
        """Centred statistics of the union of ``index`` cells (one expert).

        Each cell is centred about its own mean first (small numbers: its
        shift is near that mean), then the between-cell scatter
        ``sum_k n_k (mu_k - mu)(mu_k - mu)^T`` is added, all in float64.
        With ``scratch``, the Gram matrix is built in its buffer ``name`` (valid until that buffer is
        taken again) and the packed sum in its buffer ``"packed"``. ``same_gram``: the union of the same
        cells of statistics that share this one's rows and Gram arrays (another target, as the audit's):
        its Gram matrix is reused, only the target's sums are centred. ``lower_only``: the Gram
        matrix's lower triangle only (its upper one is left as the buffer held it), for a caller that
        factors it and needs no more: saves the symmetrisation.
        """
        index = np.asarray(index, dtype=np.int64)
        index = index[self.n[index] > 0]
        n = float(self.n[index].sum()) if index.size else 0.0
        if n == 0:
            raise ValueError(f"cells {np.asarray(index).tolist()} hold no rows")
        nk = self.n[index]
        m = self.sx[index] / nk[:, None]  # each cell's mean of x - c_k
        mu_k = self.shift[index] + m
        sy = float(self.sy[index].sum())
        syy = float(self.syy[index].sum())
        mu = nk @ mu_k / n
        ybar_k = self.sy[index] / nk
        xty = ((self.xty[index] - m * self.sy[index][:, None]).sum(0)
               + (nk * (ybar_k - sy / n)) @ (mu_k - mu))
        if same_gram is not None:
            if same_gram.n != n or not np.array_equal(same_gram.xbar, mu):
                raise ValueError("same_gram is the union of other rows")
            return CenteredStats(n, mu, sy / n, same_gram.gram, xty, syy - sy * sy / n)
        p = self.sx.shape[1]
        if index.size == 1:  # one cell: unpacked straight from its totals
            packed = self.xtx[index[0]]
        else:  # summed one cell at a time: no (len(index), P^2/2) temporary
            if scratch is None:
                packed = self.xtx[index[0]].copy()
            else:
                packed = scratch.take("packed", self.xtx.shape[1:], np.float64)
                np.copyto(packed, self.xtx[index[0]])
            for k in index[1:]:
                packed += self.xtx[k]
        gram = unpack_lower(packed, scratch.take(name, (p, p), np.float64) if scratch is not None else None)
        del packed
        # + sum_k [n_k (mu_k - mu)(mu_k - mu)^T - n_k m_k m_k^T]: two rank-(cells) BLAS updates of the lower
        # triangle in place (no P x P temporaries), then one symmetrisation
        a = (mu_k - mu) * np.sqrt(nk)[:, None]
        b = m * np.sqrt(nk)[:, None]
        g = gram.T  # Fortran-ordered: its upper triangle is gram's lower one
        for sign, f in ((1.0, a), (-1.0, b)):
            out = _dsyrk(sign, np.asfortranarray(f.T), beta=1.0, c=g, trans=0, lower=0, overwrite_c=1)
            if not np.shares_memory(out, g):  # pragma: no cover - f2py copied: keep the result
                g[...] = out
        if not lower_only:
            symmetrize_lower(gram)
        return CenteredStats(n, mu, sy / n, gram, xty, syy - sy * sy / n)

    # -------------------------------------------------------------- I/O
    def to_zarr(self, path: str | Path) -> None:
        """Write to a zarr store (one array per statistic, float64; ``xtx`` blosc-compressed)."""
        import xarray as xr
        import zarr
        from zarr.codecs import BloscCodec

        ds = xr.Dataset(
            {
                "n": ("cell", self.n), "sx": (("cell", "feature"), self.sx), "sy": ("cell", self.sy),
                "syy": ("cell", self.syy), "xtx": (("cell", "packed_lower"), self.xtx),
                "xty": (("cell", "feature"), self.xty), "shift": (("cell", "feature"), self.shift),
            },
            attrs={"meta": json.dumps(self.meta), "kind": "snrmoe.SufficientStats", "version": "3",
                   "xtx_layout": "lower triangle packed by rows: row i holds xtx[i, :i+1] at offset i(i+1)/2"},
        )
        # float64 sums of float32 products carry ~29 random low mantissa bits but share their high
        # bytes: bit-shuffled lz4 at level 1 keeps ~44 % of the bytes at > 1 GB/s (measured at 20k
        # and 1M), halving the store and the fresh pages its write has to fault in
        codec = BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle")
        enc = {"xtx": {"chunks": (1, self.xtx.shape[1]), "compressors": (codec,)}}
        # two cells in flight: each holds its compressed copy until written, and the write
        # comes at the fit's memory peak (zarr's default of 10 added 0.26 GB to the default job's peak)
        with zarr.config.set({"async.concurrency": 2}):
            ds.to_zarr(path, mode="w", zarr_format=3, consolidated=False, encoding=enc)
        consolidate(path)

    @classmethod
    def from_zarr(cls, path: str | Path) -> SufficientStats:
        """Load statistics written by :meth:`to_zarr`; validates shapes."""
        import xarray as xr

        ds = xr.open_zarr(path, consolidated=False)
        if ds.attrs.get("kind") != "snrmoe.SufficientStats":
            raise ValueError(f"{path} is not a snrmoe sufficient-statistics store")
        k, p = ds.sizes["cell"], ds.sizes["feature"]
        if ds["xtx"].shape == (k, p, p):  # version 2: full matrices (lower triangle used)
            xtx = np.stack([pack_lower(np.asarray(ds["xtx"][c].values, np.float64)) for c in range(k)])
        elif ds["xtx"].shape == (k, tri_size(p)):
            xtx = np.asarray(ds["xtx"].values, dtype=np.float64)
        else:
            raise ValueError(f"{path}: xtx has shape {ds['xtx'].shape}, expected {(k, tri_size(p))} (packed)")
        arrs = {name: np.asarray(ds[name].values, dtype=np.float64)
                for name in ("n", "sx", "sy", "syy", "xty", "shift")}
        arrs["xtx"] = xtx
        return cls(**arrs, meta=json.loads(ds.attrs.get("meta", "{}")))


def impute_bad_pixels(flux: np.ndarray, good: np.ndarray | None, copy: bool = True) -> np.ndarray:
    """Replace bad pixels by the spectrum's median good flux (float32 copy).

    A linear model needs a value at every pixel; the row median is the local
    continuum level, so an imputed pixel adds no line signal. Rows with no good
    pixel become all zeros (they are excluded from training upstream). With
    ``copy=False`` a float32 ``flux`` without bad pixels is returned as is, so
    the caller must not write to the result. ``good=None`` says that every
    pixel is good (a block whose pixel counts are known).
    """
    bad_rows = np.zeros(0, np.int64) if good is None else np.flatnonzero(~good.all(axis=1))
    if bad_rows.size == 0 and not copy:
        return np.asarray(flux, dtype=np.float32)  # nothing to impute: may be ``flux`` itself (read only!)
    out = np.array(flux, dtype=np.float32, copy=True)
    if bad_rows.size == 0:
        return out
    # only rows with a bad pixel are touched: no block-sized temporaries (fresh pages are not free)
    sub, gsub = out[bad_rows], good[bad_rows]
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-bad rows: handled below
        med = np.nanmedian(np.where(gsub, sub, np.nan), axis=1)
    med = np.where(np.isfinite(med), med, 0.0).astype(np.float32)
    out[bad_rows] = np.where(gsub, sub, med[:, None])
    return out


def memory_bytes(n_cells: int, n_features: int, flush_rows: int, precision: str = "float32") -> int:
    """Resident bytes of one :class:`CellAccumulator` at its peak (see docs/design.md).

    Packed float64 totals (K P(P+1)/2 8) + the working-precision scratch
    matrices a flush goes through (:class:`FlushBuffers`, two of P^2 w) + row
    buffers (K B P w).
    """
    item = 4 if precision == "float32" else 8
    return (n_cells * tri_size(n_features) * 8 + FLUSH_DEPTH * n_features * n_features * item
            + n_cells * flush_rows * n_features * item)


def symmetrize_lower(m: np.ndarray, tile: int = 64) -> np.ndarray:
    """Copy the lower triangle of square ``m`` onto its upper triangle, in place.

    Works tile by tile so each transpose stays in L1/L2 (a whole-matrix
    transposed copy of a 4096^2 float64 matrix is cache-hostile); a diagonal
    tile is copied row by row. 64-row tiles: 0.04 s at P = 4096 here, the cost
    of a plain copy (512-row tiles and fancy-indexed diagonals took 0.17 s).
    """
    p = m.shape[0]
    for i in range(0, p, tile):
        ie = min(i + tile, p)
        for j in range(ie, p, tile):
            je = min(j + tile, p)
            m[i:ie, j:je] = m[j:je, i:ie].T
        for r in range(i, ie - 1):
            m[r, r + 1:ie] = m[r + 1:ie, r]
    return m


#: scratch matrices a chain's flushes rotate through (:class:`FlushBuffers`): one computes while the other is added
FLUSH_DEPTH = 2


class FlushBuffers:
    """The ``P x P`` working-precision matrices the accumulators of one chain flush through.

    A flush computes its ``syrk`` into one buffer; adding that buffer's triangle into the cell's packed
    float64 total (:func:`pack_lower`, memory-bound: ~27 ms at P = 4096, a third of a 1,024-row update)
    is handed to the chain's pack thread, and the next flush computes into the other buffer meanwhile.
    The pack thread takes the additions in order, one at a time, so every total receives the same sums
    in the same order as a synchronous flush: the statistics are bit-identical. One thread per set of
    buffers (per chain), so chains on a many-core worker do not queue behind each other's additions; it
    ends when the buffers are dropped. :meth:`settle` waits for the pending additions; the accumulators
    call it before anyone reads their totals, and pickling settles first and keeps no buffer.

    Parameters
    ----------
    depth : int
        Buffers in rotation; 1 adds synchronously (one buffer, no pack thread).
    """

    def __init__(self, depth: int = FLUSH_DEPTH):
        self.depth = max(1, int(depth))
        self._arrays: list = [None] * self.depth
        self._pending: list = [None] * self.depth
        self._next = 0
        self._thread = None  # a one-thread executor, started by the first hand-over

    def take(self, p: int, dtype) -> tuple[int, np.ndarray]:
        """The next free buffer (``p x p``, Fortran-ordered, ``dtype``), after its previous addition is done."""
        i = self._next
        self._next = (i + 1) % self.depth
        self._wait(i)
        a = self._arrays[i]
        if a is None or a.shape[0] != p or a.dtype != dtype:
            a = self._arrays[i] = np.empty((p, p), dtype, order="F")
        return i, a

    def pack(self, i: int, out: np.ndarray) -> None:
        """``out += lower triangle`` of buffer ``i`` (as a C-ordered matrix): on the pack thread if depth > 1."""
        if self.depth == 1:
            pack_lower(self._arrays[i].T, out=out)
        else:
            if self._thread is None:
                from concurrent.futures import ThreadPoolExecutor

                self._thread = ThreadPoolExecutor(1, thread_name_prefix="snrmoe-pack")
            self._pending[i] = self._thread.submit(pack_lower, self._arrays[i].T, out)

    def _wait(self, i: int) -> None:
        f, self._pending[i] = self._pending[i], None
        if f is not None:
            f.result()  # re-raises a failed addition

    def settle(self) -> None:
        """Wait until every handed-over addition is in its total."""
        for i in range(self.depth):
            self._wait(i)

    def __getstate__(self) -> dict:
        self.settle()
        return {"depth": self.depth}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["depth"])


class CellAccumulator:
    """Streaming per-cell accumulation with large, in-place BLAS calls.

    Rows are appended to per-cell buffers. A full buffer is multiplied out by
    one ``syrk`` (``C <- A^T A``) into one of the chain's two
    working-precision scratch matrices, whose triangle is then added into the
    cell's packed float64 total (on a second thread while the next flush
    computes, :class:`FlushBuffers`). Float32 products therefore sum at most
    ``flush_rows`` rows before they reach float64. Buffers are allocated
    lazily, so untouched cells cost no resident memory.

    Parameters
    ----------
    n_cells : int
    shift : ndarray of shape (P,) or (n_cells, P)
        A shift shared by every cell, or one per cell (near the cell's mean).
    flush_rows : int
        Rows buffered per cell before one ``syrk``.
    precision : {"float32", "float64"}
        Arithmetic of the products.
    """

    def __init__(self, n_cells: int, shift: np.ndarray, *, flush_rows: int = 1024, precision: str = "float32",
                 meta: dict | None = None):
        if precision not in ("float32", "float64"):
            raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
        self.dtype = np.float32 if precision == "float32" else np.float64
        self.flush_rows = int(flush_rows)
        # the shift is applied in the working precision, so record exactly that value
        shift = np.asarray(shift)
        p = shift.shape[-1]
        self._shift = np.ascontiguousarray(np.broadcast_to(shift, (n_cells, p)), self.dtype)
        self.stats = SufficientStats.zeros(n_cells, self._shift.astype(np.float64), meta)
        self._p = p
        self._buf = np.empty((n_cells, self.flush_rows, p), self.dtype)
        self._ybuf = np.empty((n_cells, self.flush_rows), np.float64)
        self._fill = np.zeros(n_cells, np.int64)
        self._scratch = FlushBuffers()  # accumulators of one chain share them (share_scratch)
        self.rows_seen = 0
        self.blas_pieces = 1  # BLAS calls per update at once (blas.syrk_update); set by the fold

    def __getstate__(self) -> dict:
        self._scratch.settle()  # before the totals are copied: pickling (a dask spill) sees every flush added
        return self.__dict__.copy()

    def share_scratch(self, other: CellAccumulator) -> CellAccumulator:
        """Flush through ``other``'s :class:`FlushBuffers` (accumulators that flush one at a time, as those
        of one chain do, need only one set between them); returns self."""
        self._scratch = other._scratch
        return self

    def flush_all(self) -> SufficientStats:
        """Flush every buffer into the float64 totals and return them (shared with the accumulator).

        A fresh :meth:`resume` of them continues bit-identically, because
        both start from empty buffers.
        """
        for k in range(self.stats.n_cells):
            self._flush(k)
        self._scratch.settle()
        return self.stats

    @classmethod
    def resume(cls, stats: SufficientStats, *, flush_rows: int = 1024, precision: str = "float32") -> CellAccumulator:
        """An accumulator that continues from totals written by :meth:`flush_all`."""
        acc = cls(stats.n_cells, stats.shift, flush_rows=flush_rows, precision=precision, meta=stats.meta)
        if not np.array_equal(acc.stats.shift, stats.shift):
            raise ValueError("checkpoint shift is not representable in the working precision")
        acc.stats = stats
        return acc

    def add(self, x: np.ndarray, y: np.ndarray, cell: np.ndarray) -> None:
        """Add rows ``x`` (n, P) with targets ``y`` (n,) to cells ``cell`` (n,).

        Rows with ``cell < 0`` are skipped (not train, or unusable).
        """
        cell = np.asarray(cell)
        keep = np.flatnonzero(cell >= 0)
        if keep.size == 0:
            return
        # rows are gathered cell by cell straight into the buffers: no sorted copy of the block
        order = keep[np.argsort(cell[keep], kind="stable")]
        sorted_cells = cell[order]
        y = np.asarray(y, np.float64)
        bounds = np.flatnonzero(np.diff(sorted_cells)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, order.size]):
            self._push(int(sorted_cells[lo]), x, y, order[lo:hi])
        self.rows_seen += int(keep.size)

    def _push(self, k: int, x: np.ndarray, y: np.ndarray, rows: np.ndarray) -> None:
        while rows.size:
            f = int(self._fill[k])
            take = min(self.flush_rows - f, rows.size)
            dst = self._buf[k, f:f + take]
            if x.dtype == dst.dtype and x.flags.c_contiguous:
                np.take(x, rows[:take], axis=0, out=dst)
                dst -= self._shift[k]
            else:
                np.subtract(x[rows[:take]], self._shift[k], out=dst, casting="unsafe")
            self._ybuf[k, f:f + take] = y[rows[:take]]
            self._fill[k] += take
            rows = rows[take:]
            if self._fill[k] == self.flush_rows:
                self._flush(k)

    def _flush(self, k: int) -> None:
        m = int(self._fill[k])
        if m == 0:
            return
        a = self._buf[k, :m]
        yk = self._ybuf[k, :m]
        s = self.stats
        slot, scratch = self._scratch.take(self._p, self.dtype)
        # C <- a^T a on C's upper triangle; a.T is Fortran-ordered, so nothing is copied. C is Fortran-ordered,
        # so as a C-ordered array (C.T) the products sit in the *lower* triangle, the packed layout's.
        # releases the GIL: the worker's other tasks run meanwhile
        syrk_update(scratch, a, beta=0.0, pieces=self.blas_pieces)
        self._scratch.pack(slot, s.xtx[k])  # into the float64 total while the next flush computes
        # sum(x - c) and sum((x - c) y) in one GEMV in the working precision, added into float64
        w = np.empty((2, m), self.dtype)
        w[0] = 1.0
        w[1] = yk
        sums = w @ a
        s.sx[k] += sums[0]
        s.xty[k] += sums[1]
        s.n[k] += m
        s.sy[k] += yk.sum()
        s.syy[k] += yk @ yk
        self._fill[k] = 0

    def finalize(self, into: SufficientStats | None = None) -> SufficientStats:
        """Flush everything and free the buffers; returns the statistics, or adds them to ``into``."""
        s = self.flush_all()
        self._buf = self._ybuf = None
        self._scratch = FlushBuffers()  # others sharing the old buffers keep them
        if into is None:
            return s
        self.stats = None
        return into.iadd(s)
