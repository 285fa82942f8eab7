from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from snrmoe_dask.ridge import ridge_alphas, solve_ridge
from snrmoe_dask.stats import CellAccumulator


def _problem(seed=0, n=400, p=30):
    rng = np.random.default_rng(seed)
    x = rng.normal(50.0, 5.0, (n, p))
    w = rng.normal(size=p) * 0.1
    y = x @ w + rng.normal(scale=0.5, size=n) + 3.0
    acc = CellAccumulator(1, x[:20].mean(0), precision="float64")
    acc.add(x, y, np.zeros(n, np.int64))
    return x, y, acc.finalize().cells([0])


@pytest.mark.parametrize("alpha", [1e-3, 1.0, 100.0, 1e5])
def test_matches_sklearn_ridge(alpha):
    x, y, cs = _problem()
    sol = solve_ridge(cs, [], fixed_alpha=alpha)
    ref = Ridge(alpha=alpha).fit(x, y)
    np.testing.assert_allclose(sol.coef, ref.coef_, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(sol.intercept, ref.intercept_, rtol=1e-6)


def test_gcv_path_matches_closed_form_hat_matrix():
    x, y, cs = _problem(1, n=120, p=15)
    alphas = np.logspace(-2, 4, 13)
    sol = solve_ridge(cs, alphas)
    xc, yc = x - x.mean(0), y - y.mean()
    n = x.shape[0]
    ref = []
    for a in alphas:
        h = xc @ np.linalg.solve(xc.T @ xc + a * np.eye(x.shape[1]), xc.T)
        rss = np.sum((yc - h @ yc) ** 2)
        ref.append(n * rss / (n - np.trace(h)) ** 2)
    np.testing.assert_allclose(sol.gcv_path, ref, rtol=1e-8)
    assert sol.alpha == alphas[int(np.argmin(ref))]
    np.testing.assert_allclose(sol.coef, Ridge(alpha=sol.alpha).fit(x, y).coef_, rtol=1e-6)


def test_shrink_toward_prior_matches_direct_solution():
    x, y, cs = _problem(2)
    prior = np.full(x.shape[1], 0.05)
    a = 250.0
    sol = solve_ridge(cs, [], prior=prior, fixed_alpha=a)
    xc, yc = x - x.mean(0), y - y.mean()
    direct = np.linalg.solve(xc.T @ xc + a * np.eye(x.shape[1]), xc.T @ yc + a * prior)
    np.testing.assert_allclose(sol.coef, direct, rtol=1e-8)
    # equivalently: sklearn on the residual target y - X prior, plus the prior
    ref = Ridge(alpha=a).fit(x, y - x @ prior)
    np.testing.assert_allclose(sol.coef, ref.coef_ + prior, rtol=1e-6)
    np.testing.assert_allclose(sol.intercept, ref.intercept_, rtol=1e-6)


def test_df_cap_and_relative_grid():
    x, y, cs = _problem(3, n=40, p=60)  # fewer rows than features
    alphas = ridge_alphas(cs, np.logspace(-8, 2, 21))
    free = solve_ridge(cs, alphas)
    capped = solve_ridge(cs, alphas, max_df_fraction=0.5)
    assert capped.df <= 0.5 * cs.n + 1e-9
    assert capped.alpha >= free.alpha
    np.testing.assert_allclose(ridge_alphas(cs, [1.0]), np.trace(cs.gram) / 60)
    with pytest.raises(ValueError, match="non-negative"):
        solve_ridge(cs, [-1.0])
