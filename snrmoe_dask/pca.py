"""Principal components of the train flux, from the sufficient statistics.

The global covariance is ``gram / (n - 1)`` of the statistics summed over all
cells, so the PCA needs no pass of its own. Projections ``(x - mean) @ V``
are added to the gate table in the same pass that applies the experts.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import eigh
from scipy.sparse.linalg import eigsh

from .stats import SufficientStats

__all__ = ["pca_from_stats"]


def pca_from_stats(stats: SufficientStats, n_components: int = 4) -> dict[str, np.ndarray]:
    """Leading principal axes of the train flux.

    Parameters
    ----------
    stats : SufficientStats
    n_components : int

    Returns
    -------
    dict
        ``mean`` (P,), ``components`` (n_components, P) with unit rows, largest
        variance first, each signed so its largest-magnitude entry is
        positive (a reproducible sign), and ``explained_variance``
        (n_components,).
    """
    cs = stats.cells(range(stats.n_cells))
    p = cs.xbar.shape[0]
    k = min(n_components, p)
    if cs.n < 2:
        raise ValueError(f"PCA needs at least 2 train rows, got {cs.n:.0f}")
    cov = cs.gram / (cs.n - 1.0)
    if 4 * k < p:  # the few leading pairs by Lanczos (ARPACK, to machine precision): no O(P^3) reduction
        vals, vecs = eigsh(cov, k=k, which="LA", tol=0.0, v0=np.ones(p))
    else:
        vals, vecs = eigh(cov, subset_by_index=[p - k, p - 1])
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order].T
    big = np.argmax(np.abs(vecs), axis=1)
    vecs *= np.sign(vecs[np.arange(k), big])[:, None]
    return {"mean": np.asarray(cs.xbar, np.float64), "components": vecs, "explained_variance": vals}
