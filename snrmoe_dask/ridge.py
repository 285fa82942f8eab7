"""Ridge regression with intercept, solved from sufficient statistics.

For centred statistics (``G = Xc^T Xc``, ``b = Xc^T yc``, ``yy = yc^T yc``)
one eigendecomposition ``G = V diag(d) V^T`` gives every point of the alpha
path in O(P) per alpha::

    w(a)   = V (z / (d + a)),            z = V^T b
    RSS(a) = yy - sum z^2 (d + 2a) / (d + a)^2
    df(a)  = sum d / (d + a)
    GCV(a) = n RSS(a) / (n - 1 - df(a))^2      (Golub, Heath & Wahba 1979)

where the ``1`` is the unpenalised intercept's degree of freedom: ``1 + df``
is the trace of the hat matrix of the design ``[1, X]``. Without it an
expert with fewer rows than pixels sees ``n - df -> 1`` as ``alpha -> 0``
and GCV rewards interpolation.

so alpha is chosen with no further pass over the data. The eigendecomposition
used to *score* the grid may be float32 (LAPACK ``ssyevd`` is ~2x faster than
``dsyevd`` here, and ranking a half-decade grid is robust to float32 error);
the chosen alpha is then *solved* exactly in float64 by Cholesky, so the
coefficients are the float64 Ridge solution. Shrinking toward a
prior ``w0`` (``min ||yc - Xc w||^2 + a ||w - w0||^2``) is the same problem
for ``u = w - w0`` with ``b' = b - G w0`` and ``yy' = yy - 2 w0.b + w0.G w0``.

The intercept is ``ybar - xbar . w`` and is never penalised, as in
``sklearn.linear_model.Ridge(fit_intercept=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from .stats import CenteredStats

__all__ = ["RidgeSolution", "eigen", "solve_ridge", "ridge_alphas", "ridge_coef"]


@dataclass(frozen=True)
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


def eigen(cs: CenteredStats, precision: str = "float64") -> tuple[np.ndarray, np.ndarray]:
    """Eigendecomposition of the centred Gram matrix (eigenvalues clipped at 0), float64 arrays."""
    if precision not in ("float32", "float64"):
        raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
    d, v = scipy.linalg.eigh(cs.gram.astype(precision), driver="evd", check_finite=False)
    return np.clip(d.astype(np.float64), 0.0, None), v.astype(np.float64)  # rounding: tiny negatives


def _exact_solve(gram: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    """(G + alpha I)^-1 b in float64; least squares if G + alpha I is singular."""
    a = gram + alpha * np.eye(gram.shape[0])
    try:
        c = scipy.linalg.cho_factor(a, lower=True, check_finite=False)
        return scipy.linalg.cho_solve(c, b, check_finite=False)
    except np.linalg.LinAlgError:
        return scipy.linalg.lstsq(a, b, check_finite=False)[0]


def ridge_coef(cs: CenteredStats, alpha: float) -> np.ndarray:
    """Coefficients at one known alpha: one float64 Cholesky solve, no eigendecomposition."""
    return _exact_solve(cs.gram, cs.xty, alpha)


def solve_ridge(cs: CenteredStats, alphas: Sequence[float], prior: np.ndarray | None = None,
                fixed_alpha: float | None = None, max_df_fraction: float = 1.0,
                eig: tuple[np.ndarray, np.ndarray] | None = None, exact: bool = True) -> RidgeSolution:
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
    eig : (d, V), optional
        A precomputed :func:`eigen` of ``cs`` (experts sharing a Gram matrix
        share the O(P^3) step); it may be a float32 decomposition.
    exact : bool
        Solve the chosen alpha in float64 by Cholesky (default). If false the
        coefficients come from the eigenbasis used for scoring.

    Returns
    -------
    RidgeSolution
    """
    b, yy = cs.xty, cs.yy
    if prior is not None:
        gw = cs.gram @ prior
        b = b - gw
        yy = yy - 2.0 * float(prior @ cs.xty) + float(prior @ gw)
    d, v = eig if eig is not None else eigen(cs)
    z = v.T @ b
    grid = np.atleast_1d(np.asarray([fixed_alpha] if fixed_alpha is not None else alphas, dtype=np.float64))
    if grid.size == 0 or np.any(grid < 0):
        raise ValueError(f"alphas must be a non-empty list of non-negative values, got {grid}")
    denom = d[None, :] + grid[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        rss = yy - np.sum(z[None, :] ** 2 * (d[None, :] + 2.0 * grid[:, None]) / denom**2, axis=1)
        df = np.sum(d[None, :] / denom, axis=1)
        rss = np.maximum(rss, 0.0)
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
    w = _exact_solve(cs.gram, b, a) if exact else v @ np.where(d + a > 0, z / np.where(d + a > 0, d + a, 1), 0.0)
    if prior is not None:
        w = w + prior
    intercept = cs.ybar - float(cs.xbar @ w)
    resid_var = float(rss[best] / max(resid_dof[best], 1.0))
    return RidgeSolution(
        coef=w, intercept=intercept, alpha=float(a), gcv=float(gcv[best]), resid_var=resid_var,
        df=float(df[best]), n=cs.n, alphas=grid, gcv_path=gcv,
        at_grid_edge=bool(fixed_alpha is None and grid.size > 1 and best in (0, grid.size - 1)),
    )
