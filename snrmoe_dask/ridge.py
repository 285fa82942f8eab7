"""Ridge regression with intercept, solved from sufficient statistics.

For centred statistics (``G = Xc^T Xc``, ``b = Xc^T yc``, ``yy = yc^T yc``)
and ``w(a) = (G + a I)^-1 b``::

    RSS(a) = yy - b.w(a) - a |w(a)|^2
    df(a)  = sum d / (d + a)                 (d: the eigenvalues of G)
    GCV(a) = n RSS(a) / (n - 1 - df(a))^2      (Golub, Heath & Wahba 1979)

where the ``1`` is the unpenalised intercept's degree of freedom: ``1 + df``
is the trace of the hat matrix of the design ``[1, X]``. Without it an
expert with fewer rows than pixels sees ``n - df -> 1`` as ``alpha -> 0``
and GCV rewards interpolation.

The whole grid is scored from one orthogonal reduction ``G = Q B Q^T``
(:func:`spectrum`), ``B`` banded: with ``q = Q^T b`` every
``b.w = q.(B + aI)^-1 q`` and ``|w| = |(B + aI)^-1 q|`` is a band solve, and
the degrees of freedom come from a tridiagonal ``T`` with the eigenvalues of
``G``. LAPACK's two-stage reduction (:mod:`snrmoe_dask.twostage`) gives ``B``
of half-bandwidth 32 from its first stage (BLAS 3) and ``T`` from its second;
two of them run at once on one thread each without the memory contention of
two one-stage ``?sytrd`` (then ``B = T``), which is used where the two-stage
routines are missing. A band solve costs
O(P kd^2) per alpha, a tridiagonal one O(P) (an expert whose rows span at most a quarter of the
pixels is scored from the eigenpairs of its range instead, :func:`range_spectrum`,
cheaper still). No eigenvectors are formed: the reduction is the
O(P^3) step, about half the cost of an eigendecomposition with vectors, and
alpha is chosen with no further pass over the data. The reduction used to
*score* the grid may be float32 (``ssytrd`` is ~2x faster than ``dsytrd``
here, and ranking a half-decade grid is robust to float32 error; a test
checks the choice against a float64 eigendecomposition); the chosen alpha is
then *solved* in float64 to the backward error of a float64 Cholesky
solve: by iterative refinement with the scoring reduction (or, for a
low-rank cell, the eigenpairs of its range) as the approximate inverse
(:func:`refined_solve`: two to three steps, 0.13-0.18 s at P = 4096, reach a
normwise backward error of about 1e-16, below ``REFINE_TOL``, where a
Cholesky factorisation costs 0.3-0.5 s), handing over to Cholesky when it
does not converge.
Shrinking toward a prior ``w0`` (``min ||yc - Xc w||^2 + a ||w - w0||^2``)
is the same problem for ``u = w - w0`` with ``b' = b - G w0`` and
``yy' = yy - 2 w0.b + w0.G w0``.

The intercept is ``ybar - xbar . w`` and is never penalised, as in
``sklearn.linear_model.Ridge(fit_intercept=True)``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from functools import cached_property

import numpy as np
import scipy.linalg
import scipy.linalg.lapack

from . import twostage
from .blas import cholesky_upper
from .stats import CenteredStats, Scratch

__all__ = ["RidgeSolution", "RangeSpectrum", "Spectrum", "range_spectrum", "spectrum", "solve_ridge", "ridge_alphas",
           "ridge_coef", "cholesky_solve_in_place", "refined_solve", "REFINE_TOL"]


@dataclasses.dataclass(frozen=True)
class RidgeSolution:
    """One fitted expert.

    Attributes
    ----------
    coef : ndarray of shape (P,)
    intercept : float
    alpha : float
        Chosen penalty (absolute, in the units of ``G``).
    gcv : float
        GCV score at ``alpha`` (mean squared residual scale, logg^2).
    resid_var : float
        In-sample residual variance ``RSS / (n - 1 - df)`` at ``alpha``.
    df : float
        Effective degrees of freedom at ``alpha``.
    n : float
        Rows.
    alphas, gcv_path : ndarray
        The grid and its scores.
    at_grid_edge : bool
        True if the chosen alpha is the first or last grid point.
    """

    coef: np.ndarray
    intercept: float
    alpha: float
    gcv: float
    resid_var: float
    df: float
    n: float
    alphas: np.ndarray
    gcv_path: np.ndarray
    at_grid_edge: bool


def ridge_alphas(cs: CenteredStats, relative: Sequence[float]) -> np.ndarray:
    """Absolute alphas: ``relative * trace(G) / P`` (the mean eigenvalue).

    A relative grid is scale-free: it moves with the flux units and with n.
    """
    scale = float(np.trace(cs.gram)) / cs.gram.shape[0]
    return np.asarray(relative, dtype=np.float64) * max(scale, np.finfo(float).tiny)


@dataclasses.dataclass(frozen=True)
class Spectrum:
    """``G = Q B Q^T`` with ``B`` banded, and ``T`` tridiagonal with ``B``'s eigenvalues (:func:`spectrum`).

    From the one-stage reduction ``?sytrd`` (``kd = 1``), ``B = T``. From the
    two-stage one (:mod:`snrmoe_dask.twostage`), ``B`` is the band of width
    ``kd`` left by the first stage, ``Q`` that stage's reflectors, and ``T``
    the second stage's tridiagonal form of ``B`` (its reflectors are not kept):
    the degrees of freedom come from ``T``, the residuals from solves with
    ``B + aI`` on ``Q^T b``.

    Attributes
    ----------
    reflectors : ndarray of shape (P, P)
        The reduction's output: the Householder vectors of ``Q`` below the
        ``kd``-th subdiagonal (a QR factorisation of ``reflectors[kd:, :P - kd]``).
    tau : ndarray of shape (P - kd,)
    diag, offdiag : ndarray of shape (P,), (P - 1,)
        ``T``, float64.
    eigenvalues : ndarray of shape (P,) or None
        Of ``T + shift I``, ascending, float64; ``None`` when the rows
        outnumber the pixels (no eigenvalue is zeroed by rank, so the degrees
        of freedom come from :meth:`dof`'s trace instead).
    shift : float
        ``max(0, -lambda_min(T))``: rounding can leave ``T`` slightly
        indefinite; the shift makes it positive semi-definite, and the same
        shifted matrix gives both the degrees of freedom and the residuals.
    kd : int
        Half-bandwidth of ``B`` (1: ``B`` is ``T``).
    band : ndarray of shape (kd + 1, P) or None
        ``B`` in LAPACK's lower band storage, float64 (``None`` when ``kd = 1``).
    """

    reflectors: np.ndarray
    tau: np.ndarray
    diag: np.ndarray
    offdiag: np.ndarray
    eigenvalues: np.ndarray | None
    shift: float
    kd: int = 1
    band: np.ndarray | None = None

    def dof(self, alphas: np.ndarray) -> np.ndarray:
        """``sum d / (d + a) = P - a tr((T + shift I + a I)^-1)`` for each ``a > 0``, O(P) per alpha.

        The diagonal of a tridiagonal inverse from its two pivot sequences
        (forward ``f`` and backward ``g`` of the LDL^T and UDU^T
        factorisations): ``(A^-1)_ii = 1 / (f_i + g_i - A_ii)``. The pivots come
        from LAPACK's ``dpttrf`` on the matrix and on its reversal (0.1 ms per
        alpha at P = 4096); a matrix it finds not positive definite gets the same
        recurrences in NumPy.
        """
        a = np.asarray(alphas, np.float64)
        if self.diag.size < 2:
            return self._dof_recurrence(a)
        out = np.empty(a.shape)
        for k, alpha in enumerate(a):
            diag = self.diag + self.shift + alpha
            f, _, info_f = scipy.linalg.lapack.dpttrf(diag, self.offdiag)
            g, _, info_g = scipy.linalg.lapack.dpttrf(diag[::-1].copy(), self.offdiag[::-1].copy())
            if info_f or info_g:
                out[k] = self._dof_recurrence(np.array([alpha]))[0]
            else:
                out[k] = diag.size - alpha * np.sum(1.0 / (f + g[::-1] - diag))
        return out

    def _dof_recurrence(self, alphas: np.ndarray) -> np.ndarray:
        """:meth:`dof` by the pivot recurrences in NumPy, every alpha at once."""
        a = np.asarray(alphas, np.float64)[None, :]
        diag = (self.diag + self.shift)[:, None] + a
        off2 = (self.offdiag ** 2)[:, None]
        p = diag.shape[0]
        f, g = np.empty_like(diag), np.empty_like(diag)
        f[0], g[-1] = diag[0], diag[-1]
        for i in range(1, p):
            f[i] = diag[i] - off2[i - 1] / f[i - 1]
            g[p - 1 - i] = diag[p - 1 - i] - off2[p - 1 - i] / g[p - i]
        return p - a[0] * np.sum(1.0 / (f + g - diag), axis=0)

    @cached_property
    def _householder(self) -> np.ndarray:
        """The reflectors as ``?ormqr`` takes them (``Q`` acts on rows kd..P-1 as the ``Q`` of a QR
        factorisation whose vectors sit below the diagonal of ``reflectors[kd:, :P - kd]``), float64 and
        Fortran-ordered: cast once per reduction, shared by every :meth:`rotate`."""
        return np.asfortranarray(self.reflectors[self.kd:, :self.reflectors.shape[0] - self.kd], dtype=np.float64)

    def rotate(self, b: np.ndarray) -> np.ndarray:
        """``Q^T b`` for b of shape (P,) or (P, k), in float64.

        One blocked ``dormqr`` on the float64 reflectors (23 ms per column at P = 4096 here, against
        75 ms for applying the P - 1 reflectors one by one in NumPy, to 3e-15).
        """
        return self._apply_q(b, "T")

    def unrotate(self, q: np.ndarray) -> np.ndarray:
        """``Q q`` (the inverse of :meth:`rotate`), in float64."""
        return self._apply_q(q, "N")

    def _apply_q(self, b: np.ndarray, trans: str) -> np.ndarray:
        out = np.array(b, dtype=np.float64, copy=True)
        vec = out.ndim == 1
        out = out[:, None] if vec else out
        kd = self.kd
        if out.shape[0] > kd:  # Q = H(1) ... H(P-kd) acts on rows kd..P-1
            a, dormqr = self._householder, scipy.linalg.lapack.dormqr
            rest = np.asfortranarray(out[kd:])
            lwork = max(1, int(dormqr("L", trans, a, self.tau, rest, -1)[1][0]))
            cq, _, info = dormqr("L", trans, a, self.tau, rest, lwork, overwrite_c=1)
            if info != 0:  # pragma: no cover - LAPACK reports an illegal argument only
                raise np.linalg.LinAlgError(f"dormqr failed (info={info})")
            out[kd:] = cq
        return out[:, 0] if vec else out

    @cached_property
    def largest(self) -> float:
        """The largest eigenvalue of ``T + shift I`` (bisection, no full spectrum)."""
        if self.eigenvalues is not None:
            return float(self.eigenvalues[-1])
        if self.diag.size < 2:
            return float(self.diag[0] + self.shift)
        n = self.diag.size
        return float(scipy.linalg.eigvalsh_tridiagonal(self.diag, self.offdiag, select="i", select_range=(n - 1, n - 1),
                                                       check_finite=False)[0]) + self.shift

    def approx_inverse(self, r: np.ndarray, alpha: float) -> np.ndarray:
        """``(G + alpha I)^-1 r`` with ``G`` taken as the reduction ``Q B Q^T`` (exact up to the reduction's
        rounding: float32 reflectors and band leave ~1e-7 relative error, which :func:`refined_solve` removes)."""
        return self.unrotate(self.solve(self.rotate(r), alpha))

    def solve(self, q: np.ndarray, alpha: float) -> np.ndarray:
        """``(B + (shift + alpha) I)^-1 q``: O(P) for a tridiagonal ``B``, O(P kd^2) for a band."""
        if self.band is not None:
            ab = self.band.copy()
            ab[0] += self.shift + alpha
            try:  # positive definite for any alpha > 0 once shifted: band Cholesky
                return scipy.linalg.solveh_banded(ab, q, lower=True, overwrite_ab=True, check_finite=False)
            except np.linalg.LinAlgError:  # rounding at a tiny alpha: the band LU, as the tridiagonal path
                full = np.zeros((2 * self.kd + 1, ab.shape[1]))
                full[self.kd:] = self.band
                full[self.kd] += self.shift + alpha
                for i in range(1, self.kd + 1):  # the upper band mirrors the lower one
                    full[self.kd - i, i:] = self.band[i, :-i]
                return scipy.linalg.solve_banded((self.kd, self.kd), full, q, check_finite=False)
        d = self.diag + self.shift + alpha
        band = np.zeros((3, d.size))
        band[0, 1:], band[1], band[2, :-1] = self.offdiag, d, self.offdiag
        return scipy.linalg.solve_banded((1, 1), band, q, check_finite=False)


@dataclasses.dataclass(frozen=True)
class RangeSpectrum:
    """``G = V diag(d) V^T`` on the range of a Gram matrix of low rank (fewer rows than pixels).

    Centred rows span at most ``n - 1`` directions, and ``b = Xc^T yc`` lies in
    that span, so the eigenpairs of the range are all GCV needs.
    """

    eigenvalues: np.ndarray
    vectors: np.ndarray

    def rotate(self, b: np.ndarray) -> np.ndarray:
        """``V^T b``."""
        return self.vectors.T @ b

    @property
    def largest(self) -> float:
        """The largest eigenvalue (0 for an empty range)."""
        return float(self.eigenvalues[-1]) if self.eigenvalues.size else 0.0

    def solve(self, q: np.ndarray, alpha: float) -> np.ndarray:
        """``(diag(d) + alpha I)^-1 q``."""
        return q / (self.eigenvalues + alpha)

    def approx_inverse(self, r: np.ndarray, alpha: float) -> np.ndarray:
        """``(G + alpha I)^-1 r`` with ``G`` taken as ``V diag(d) V^T`` (exactly 0 off the range), ``alpha > 0``."""
        q = self.vectors.T @ r
        return self.vectors @ (q / (self.eigenvalues + alpha)) + (r - self.vectors @ q) / alpha


_RANGE_OVERSAMPLE = 8


def range_spectrum(cs: CenteredStats, seed: int = 0, precision: str = "float64",
                   scratch: Scratch | None = None) -> RangeSpectrum:
    """Eigenpairs of the range of a rank-deficient centred Gram matrix.

    A Gaussian sketch ``Y = G Omega`` with ``k = n - 1 + 8`` columns spans the
    range of ``G`` (rank at most ``n - 1``); ``B = Q^T G Q`` on its orthonormal
    basis has the same non-zero eigenvalues. Cost ``~3 P^2 k`` instead of the
    ``~4/3 P^3`` of a reduction: 0.3 s against 2.4 s for a 4096-pixel cell of
    200 rows here. In ``precision="float32"`` (for scoring the grid, as the
    float32 reduction) the products run at twice the speed (0.55 -> 0.36 s for
    a cell of 450 rows; eigenvalues to ~1e-7 of the largest); the eigenpairs
    are returned in float64 either way.
    """
    p = cs.gram.shape[0]
    k = min(p, max(int(cs.n) - 1, 1) + _RANGE_OVERSAMPLE)
    if precision == "float64":
        g = cs.gram
    elif scratch is None:
        g = cs.gram.astype(precision)
    else:
        g = scratch.take("range", (p, p), precision)
        np.copyto(g, cs.gram, casting="same_kind")
    omega = np.random.default_rng(seed).standard_normal((p, k), dtype=g.dtype)
    # SciPy's economic QR queries LAPACK for its blocked workspace: 0.21 s for a 4096 x 706 float32 sketch,
    # against 0.50 s for numpy.linalg.qr here
    q, _ = scipy.linalg.qr(g @ omega, mode="economic", overwrite_a=True, check_finite=False)
    d, u = np.linalg.eigh(q.T @ (g @ q))
    return RangeSpectrum(eigenvalues=np.clip(d.astype(np.float64), 0.0, None), vectors=(q @ u).astype(np.float64))


#: half-bandwidth of the two-stage reduction's band: its two stages cost 1.1 + 0.4 s at P = 4096 here, with 16 or
#: 64 the sum is the same or worse (the first stage slows with a narrow band, the second with a wide one)
BAND_WIDTH = 32


def spectrum(cs: CenteredStats, precision: str = "float64", scratch: Scratch | None = None,
             two_stage: bool | None = None) -> Spectrum | RangeSpectrum:
    """What scores the alpha grid, in ``precision``: :func:`range_spectrum` when the rows span at most a
    quarter of the pixels, else a reduction (in ``scratch``'s buffer ``"reduce"`` if given, so the returned
    reflectors live there): LAPACK's two-stage one (:mod:`snrmoe_dask.twostage`) when it is available and
    ``P > 4 kd``, else ``?sytrd``. ``two_stage`` forces one or the other (``True`` fails if the
    two-stage routines were not found)."""
    if precision not in ("float32", "float64"):
        raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
    p = cs.gram.shape[0]
    if 4 * (max(int(cs.n) - 1, 1) + _RANGE_OVERSAMPLE) <= p:
        return range_spectrum(cs, precision=precision, scratch=scratch)
    if two_stage and not twostage.AVAILABLE:
        raise RuntimeError("the two-stage reduction (?sytrd_sy2sb, ?sytrd_sb2st) was not found in SciPy's LAPACK")
    if two_stage is None:
        two_stage = twostage.AVAILABLE and p > 4 * BAND_WIDTH
    two_stage = two_stage and p > 1  # a 1 x 1 matrix is its own tridiagonal form
    kd = min(BAND_WIDTH, p - 1) if two_stage else 1
    # symmetric: the transposed view of the copy is the same matrix in Fortran order (reduced in place)
    if scratch is None:
        work = cs.gram.astype(precision).T
    else:
        work = scratch.take("reduce", (p, p), precision, order="F")
        np.copyto(work.T, cs.gram, casting="same_kind")
    band = None
    if two_stage:
        b, tau = twostage.band_reduce(work, kd)
        d, e = twostage.band_to_tridiagonal(b, kd)
        band = b.astype(np.float64)
    else:
        lapack = scipy.linalg.lapack
        sytrd, lwork = (lapack.ssytrd, lapack.ssytrd_lwork) if precision == "float32" else (lapack.dsytrd,
                                                                                             lapack.dsytrd_lwork)
        work, d, e, tau, info = sytrd(work, lower=1, overwrite_a=1, lwork=max(1, int(lwork(p)[0])))
        if info != 0:  # pragma: no cover - LAPACK reports an illegal argument only
            raise np.linalg.LinAlgError(f"?sytrd failed (info={info})")
    d, e = d.astype(np.float64), e.astype(np.float64)
    if p > 1 and int(cs.n) - 1 >= p:  # full rank: only the smallest eigenvalue (bisection), for the shift
        lam, lam_min = None, float(scipy.linalg.eigvalsh_tridiagonal(d, e, select="i", select_range=(0, 0),
                                                                      check_finite=False)[0])
    else:
        lam = scipy.linalg.eigvalsh_tridiagonal(d, e, check_finite=False) if p > 1 else d.copy()
        lam_min = float(lam[0])
    shift = max(0.0, -lam_min)
    return Spectrum(reflectors=work, tau=tau.astype(np.float64), diag=d, offdiag=e,
                    eigenvalues=None if lam is None else lam + shift, shift=shift, kd=kd, band=band)


def _cholesky_lower(a: np.ndarray, alpha: float) -> tuple | None:
    """Cholesky factor of ``G + alpha I`` from the lower triangle of C-ordered ``a`` (``G``), in place.

    ``a``'s transposed view is Fortran-ordered with that triangle as its upper one, so LAPACK factors it
    where it lies (:func:`~snrmoe_dask.blas.cholesky_upper`); the other triangle is not read. Returns
    :func:`scipy.linalg.cho_factor`'s pair, or ``None`` if the matrix is not positive definite at working
    precision (``a`` is then spoiled).
    """
    a.flat[::a.shape[0] + 1] += alpha
    return None if cholesky_upper(a.T) else (a.T, False)


def _exact_solve(gram: np.ndarray, b: np.ndarray, alpha: float, factors: dict | None = None,
                 scratch: Scratch | None = None, name: str = "factor") -> np.ndarray:
    """(G + alpha I)^-1 b in float64; least squares if G + alpha I is singular.

    ``factors`` (a dict owned by the caller, for one ``G``) keeps the Cholesky
    factor of each alpha, so a second right-hand side at the same alpha (an
    expert and its shrunk twin) costs two triangular solves, not a factorisation.
    With ``scratch`` the factor is computed in its buffer ``name`` (and
    ``factors`` then keeps only the latest).
    """
    if factors is not None and alpha in factors:
        return scipy.linalg.cho_solve(factors[alpha], b, check_finite=False)
    if scratch is None:
        a = np.array(gram, dtype=np.float64, copy=True)
    else:
        a = scratch.take(name, gram.shape, np.float64)
        np.copyto(a, gram)
        if factors is not None:
            factors.clear()  # their factors sat in this buffer
    c = _cholesky_lower(a, alpha)
    if c is None:
        # not positive definite at working precision (a tiny alpha on float32-accumulated sums): the symmetric
        # indefinite factorisation (Bunch-Kaufman, as cheap as Cholesky) solves it exactly; least squares only
        # if it is singular (an SVD is 30x slower at P = 4096). Both refill the failed factor's buffer and
        # factor its Fortran-ordered view in place: no new P x P arrays (two of them were the default job's
        # memory peak during the audit's solves)
        def refilled() -> np.ndarray:
            np.copyto(a, gram)
            a.flat[::a.shape[0] + 1] += alpha
            return a.T
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # ill-conditioned is expected here
                return scipy.linalg.solve(refilled(), b, assume_a="sym", check_finite=False, overwrite_a=True)
        except np.linalg.LinAlgError:
            return scipy.linalg.lstsq(refilled(), b, check_finite=False, overwrite_a=True, lapack_driver="gelsy")[0]
    if factors is not None:
        factors[alpha] = c
    return scipy.linalg.cho_solve(c, b, check_finite=False)


#: normwise backward error ``|b - (G + aI) w| / ((|G| + a) |w| + |b|)`` at which a refined solution is accepted: a
#: float64 Cholesky solve reaches a few 1e-16 to 1e-15 at P = 4096
REFINE_TOL = 1e-14
_REFINE_STEPS = 6


def refined_solve(gram: np.ndarray, b: np.ndarray, alpha: float, spec: Spectrum | RangeSpectrum,
                  tol: float = REFINE_TOL, max_steps: int = _REFINE_STEPS) -> np.ndarray | None:
    """``(G + alpha I)^-1 b`` in float64 by iterative refinement, or ``None`` if it does not converge.

    ``spec`` (the float32 or float64 reduction that scored the grid, or a
    low-rank cell's range eigenpairs) gives an approximate inverse ``M``; each
    step computes the residual ``r = b - (G + alpha I) w`` in float64 from the
    full Gram matrix and adds ``M r``. ``M`` contracts the error by about
    ``|G| eps_32 / alpha`` per step (the float32 reduction's rounding; for a
    range, also the rounding-level eigenvalues off it): at the 1M study's
    statistics and the penalties GCV picks, two to three steps reach a
    backward error of 1e-16 (a float64 Cholesky solve: 2e-17 to 6e-17) in
    0.13-0.18 s, where the Cholesky factorisation costs 0.3 s on two threads
    and 0.5 s on one. At a tiny alpha it does not converge in ``max_steps``,
    and the caller factors ``G + alpha I`` instead; once two residuals show a
    contraction too slow to reach ``tol`` within ``max_steps`` (or none), it
    stops there (the audit's error-vector Gram matrices at the smallest
    penalties: 1e-7 -> 1e-8 per step, or no progress at all).
    """
    if alpha <= 0:
        return None
    scale = spec.largest + alpha
    b_norm = float(np.linalg.norm(b))
    w = spec.approx_inverse(b, alpha)
    previous = None
    for step in range(max_steps):
        r = b - gram @ w - alpha * w
        residual, bound = float(np.linalg.norm(r)), scale * float(np.linalg.norm(w)) + b_norm
        if residual <= tol * bound:  # b = 0 gives w = 0 here, accepted
            return w
        error = residual / bound  # bound > 0: w = 0 leaves r = b
        if previous is not None:  # give up as soon as the contraction so far cannot reach tol within max_steps
            rate = error / previous
            if rate >= 1.0 or step + np.log(tol / error) / np.log(rate) > max_steps - 1:
                return None
        previous = error
        w = w + spec.approx_inverse(r, alpha)
    return None


def ridge_coef(cs: CenteredStats, alpha: float, scratch: Scratch | None = None) -> np.ndarray:
    """Coefficients at one known alpha: one float64 Cholesky solve, no eigendecomposition."""
    return _exact_solve(cs.gram, cs.xty, alpha, scratch=scratch, name="factor-coef")


def cholesky_solve_in_place(gram_lower: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray | None:
    """``(G + alpha I)^-1 b`` by a float64 Cholesky factorisation of ``G``'s lower triangle, in place.

    ``gram_lower`` is C-ordered and only its lower triangle is read (its transposed view is the same
    triangle as Fortran's upper one); it is overwritten by the factor, so a Gram matrix needed
    afterwards must not be passed. Returns ``None`` if ``G + alpha I`` is not positive definite at
    working precision (the triangle is then spoiled: rebuild it and use :func:`ridge_coef`, which
    also handles the indefinite and singular cases).
    """
    c = _cholesky_lower(gram_lower, alpha)
    return None if c is None else scipy.linalg.cho_solve(c, b, check_finite=False)


def solve_ridge(cs: CenteredStats, alphas: Sequence[float], prior: np.ndarray | None = None,
                fixed_alpha: float | None = None, max_df_fraction: float = 1.0,
                spec: Spectrum | RangeSpectrum | None = None, factors: dict | None = None,
                scratch: Scratch | None = None) -> RidgeSolution:
    """Solve an intercept Ridge from centred statistics, alpha by GCV.

    Parameters
    ----------
    cs : CenteredStats
        The expert's rows.
    alphas : sequence of float
        Absolute penalties to score (ignored if ``fixed_alpha`` is given).
    prior : ndarray of shape (P,), optional
        Shrink toward this coefficient vector instead of zero.
    fixed_alpha : float, optional
        Use this alpha (still reports its GCV).
    max_df_fraction : float
        For an expert with no more rows than pixels (its Gram matrix is
        singular, and GCV's minimum can sit at a near-interpolating alpha),
        only alphas whose effective degrees of freedom are at most this
        fraction of the rows are eligible; if none qualifies, the largest is
        used. An expert with more rows than pixels gets the exact GCV choice
        over the whole grid.
    spec : Spectrum or RangeSpectrum, optional
        A precomputed :func:`spectrum` of ``cs`` (experts sharing a Gram
        matrix share the O(P^3) step); it may be a float32 reduction. The
        coefficients are always the float64 solution (:func:`refined_solve` with ``spec``, or Cholesky
        where that does not converge).
    factors : dict, optional
        Cholesky factors of ``G + alpha I`` by alpha, shared by solves of the
        same Gram matrix (filled as they are computed).
    scratch : Scratch, optional
        Buffers for the float64 factor (:class:`~snrmoe_dask.stats.Scratch`).

    Returns
    -------
    RidgeSolution
    """
    b, yy = cs.xty, cs.yy
    if prior is not None:
        gw = cs.gram @ prior
        b = b - gw
        yy = yy - 2.0 * float(prior @ cs.xty) + float(prior @ gw)
    sp = spec if spec is not None else spectrum(cs)
    grid = np.atleast_1d(np.asarray([fixed_alpha] if fixed_alpha is not None else alphas, dtype=np.float64))
    if grid.size == 0 or np.any(grid < 0):
        raise ValueError(f"alphas must be a non-empty list of non-negative values, got {grid}")
    if sp.eigenvalues is None and np.any(grid == 0):  # df at alpha = 0 counts eigenvalues: compute them
        lam = scipy.linalg.eigvalsh_tridiagonal(sp.diag, sp.offdiag, check_finite=False) + sp.shift
        sp = dataclasses.replace(sp, eigenvalues=lam)
    d, q = sp.eigenvalues, sp.rotate(b)
    rss, df = np.empty(grid.shape), np.empty(grid.shape)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if d is None:  # full rank (Spectrum without eigenvalues): every alpha > 0
            df[:] = sp.dof(grid)
        else:  # centred rows span at most n - 1 directions: the other eigenvalues are zero, whatever rounding left
            dr = np.where(np.arange(d.size) < d.size - max(int(cs.n) - 1, 0), 0.0, d)
            df[:] = [float(np.sum(dr / (dr + a))) if a > 0 else float(np.sum(dr > 0)) for a in grid]
        for k, a in enumerate(grid):
            try:
                u = sp.solve(q, a) if a > 0 or d[0] > 0 else np.full(q.shape, np.nan)
            except np.linalg.LinAlgError:  # alpha = 0 on a singular Gram matrix: not a candidate
                u = np.full(q.shape, np.nan)
            rss[k] = yy - float(q @ u) - a * float(u @ u)
        rss = np.where(np.isfinite(rss), np.maximum(rss, 0.0), np.inf)
        resid_dof = cs.n - 1.0 - df  # the intercept is one more degree of freedom
        gcv = np.where(resid_dof > 0, cs.n * rss / resid_dof**2, np.inf)
    rank_deficient = cs.n <= cs.gram.shape[0]
    eligible = df <= max_df_fraction * cs.n if rank_deficient else np.ones(grid.shape, bool)
    if fixed_alpha is not None:
        best = 0
    elif eligible.any() and np.isfinite(gcv[eligible]).any():
        best = int(np.argmin(np.where(eligible, gcv, np.inf)))
    else:
        best = int(np.argmax(grid))
    a = grid[best]
    w = refined_solve(cs.gram, b, a, sp)
    if w is None:
        w = _exact_solve(cs.gram, b, a, factors, scratch)
    if prior is not None:
        w = w + prior
    intercept = cs.ybar - float(cs.xbar @ w)
    resid_var = float(rss[best] / max(resid_dof[best], 1.0))
    return RidgeSolution(
        coef=w, intercept=intercept, alpha=float(a), gcv=float(gcv[best]), resid_var=resid_var,
        df=float(df[best]), n=cs.n, alphas=grid, gcv_path=gcv,
        at_grid_edge=bool(fixed_alpha is None and grid.size > 1 and best in (0, grid.size - 1)),
    )
