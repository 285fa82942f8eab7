"""Standard errors of R², ΔR² and ρ by a paired bootstrap over the frozen-test rows.

NumPy kernels only. One fixed-seed table of resampling counts (``B x n``)
is drawn once per evaluation and shared by every model, so differences
between models (ΔR², ρ) are *paired*: each draw resamples the same rows for
all of them. For a draw with counts ``c`` (a multinomial over the rows)::

    SSE = c @ (y - yhat)^2,   SST = c @ y^2 - (c @ y)^2 / sum(c),   R² = 1 - SSE / SST

so a draw of every model costs one matrix-vector product. Per-bin R² uses
the same counts restricted to the bin's rows (the bin's own variance, as
:func:`~snrmoe_dask.metrics.r2_score` of the bin does).
"""

from __future__ import annotations

import numpy as np

__all__ = ["bootstrap_counts", "r2_draws", "se", "rho_with_se"]


def bootstrap_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """Resampling counts of shape (n_boot, n): row ``b`` is one bootstrap draw of ``n`` rows."""
    if n_boot < 2:
        raise ValueError(f"bootstrap needs at least 2 draws, got {n_boot}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64) if n else np.zeros((n_boot, 0))


def r2_draws(y: np.ndarray, yhat: np.ndarray, counts: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray | None:
    """R² of every bootstrap draw, shape (n_boot,); ``None`` with fewer than 2 rows.

    Parameters
    ----------
    y, yhat : ndarray of shape (n,)
    counts : ndarray of shape (n_boot, n)
        From :func:`bootstrap_counts`.
    rows : boolean ndarray of shape (n,), optional
        Restrict to these rows (a bin); the draws keep their counts there.
    """
    y = np.asarray(y, np.float64)
    r = (y - np.asarray(yhat, np.float64)) ** 2
    c = counts
    if rows is not None:
        y, r, c = y[rows], r[rows], counts[:, rows]
    if y.size < 2:
        return None
    w = c.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        sst = c @ (y * y) - (c @ y) ** 2 / w
        out = 1.0 - (c @ r) / sst
    return np.where((w > 1) & (sst > 0), out, np.nan)


def se(draws: np.ndarray | None) -> float | None:
    """Standard deviation of the finite draws (the bootstrap standard error); ``None`` if undefined."""
    if draws is None:
        return None
    d = draws[np.isfinite(draws)]
    return float(np.std(d, ddof=1)) if d.size > 1 else None


def rho_with_se(deploy: np.ndarray | None, glob: np.ndarray | None, oracle: np.ndarray | None,
                point: tuple[float | None, float | None, float | None]) -> dict:
    """ρ = (R²_deploy − R²_global) / (R²_oracle − R²_global) with its standard error.

    ``point`` holds the three R² on the full test set; the draws are paired
    bootstrap R² of the same three models. ρ is ``None`` (with a reason)
    when the denominator is not larger than twice its own standard error:
    the oracle then does not measurably beat global and ρ means nothing.
    """
    r_d, r_g, r_o = point
    if None in point or deploy is None or glob is None or oracle is None:
        return {"rho": None, "rho_se": None, "rho_null_reason": "R² undefined (fewer than 2 rows or constant logg)"}
    denom, denom_se = r_o - r_g, se(oracle - glob)
    if denom_se is None or not denom > 2.0 * denom_se:
        return {"rho": None, "rho_se": None,
                "rho_null_reason": f"R²_oracle - R²_global = {denom:.4f} is not larger than twice its standard "
                                   f"error ({denom_se if denom_se is None else round(denom_se, 4)})"}
    with np.errstate(divide="ignore", invalid="ignore"):
        draws = (deploy - glob) / (oracle - glob)
    d = draws[np.isfinite(draws)]
    # half the 16-84 % range: the standard error for a Gaussian, and robust to the few draws whose
    # denominator comes close to zero (a ratio's bootstrap distribution has heavy tails)
    rho_se = float(np.subtract(*np.percentile(d, [84.135, 15.865])) / 2.0) if d.size > 1 else None
    return {"rho": (r_d - r_g) / denom, "rho_se": rho_se, "rho_null_reason": None}
