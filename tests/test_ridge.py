from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
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
    n, p = x.shape
    design = np.column_stack([np.ones(n), x])  # the intercept is a column of the design, not penalised
    pen = np.diag(np.r_[0.0, np.ones(p)])
    ref = []
    for a in alphas:
        h = design @ np.linalg.solve(design.T @ design + a * pen, design.T)
        rss = np.sum((y - h @ y) ** 2)
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
    # with more rows than pixels the cap does not apply: the exact GCV choice
    x2, y2, cs2 = _problem(4, n=80, p=30)
    grid = ridge_alphas(cs2, np.logspace(-8, 2, 21))
    assert solve_ridge(cs2, grid, max_df_fraction=0.1).alpha == solve_ridge(cs2, grid).alpha
    np.testing.assert_allclose(ridge_alphas(cs, [1.0]), np.trace(cs.gram) / 60)
    with pytest.raises(ValueError, match="non-negative"):
        solve_ridge(cs, [-1.0])


def test_exact_linear_target_is_recovered_when_rows_exceed_pixels():
    """logg an exact linear function of the flux, n = 1.2 P: GCV with the whole grid recovers it (R² > 0.999)."""
    from snrmoe_dask.config import FitConfig

    rng = np.random.default_rng(5)
    n, p = 480, 400
    basis = rng.normal(size=(12, p))
    # a few strong spectral components on top of pixel noise, which carries the signal in every direction
    x = 100 + rng.normal(size=(n + 200, 12)) @ basis * 5 + rng.normal(scale=3.0, size=(n + 200, p))
    w = rng.normal(size=p) * 0.01
    y = x @ w
    acc = CellAccumulator(1, x[:64].mean(0), precision="float64")
    acc.add(x[:n], y[:n], np.zeros(n, np.int64))
    cs = acc.finalize().cells([0])
    sol = solve_ridge(cs, ridge_alphas(cs, FitConfig().alphas_relative), max_df_fraction=FitConfig().max_df_fraction)
    pred = x[n:] @ sol.coef + sol.intercept
    assert 1 - np.sum((y[n:] - pred) ** 2) / np.sum((y[n:] - y[n:].mean()) ** 2) > 0.999


def _three_cells(seed, n, p, level, spread, slope):
    """Rows in three cells (row i in cell i mod 3), a linear target, and their float64 statistics."""
    rng = np.random.default_rng(seed)
    x = rng.normal(level, spread, (n, p))
    cell = (np.arange(n) % 3).astype(np.int64)
    y = x @ rng.normal(size=p) * slope + rng.normal(size=n)
    acc = CellAccumulator(3, x[:10].mean(0), precision="float64")
    acc.add(x, y, cell)
    return x, y, cell, acc.finalize()


def test_hierarchical_prior_is_the_parent_refitted_without_the_cell(monkeypatch):
    """Leave-cell-out parent from statistics (parent minus cell) equals sklearn's Ridge on the other cells' rows."""
    import snrmoe_dask.experts
    from snrmoe_dask.experts import ExpertSpec, leave_cells_out_prior, solve_expert
    from snrmoe_dask.stats import process_scratch

    x, y, cell, stats = _three_cells(seed=6, n=300, p=20, level=10.0, spread=2.0, slope=0.1)
    n, p = x.shape
    parent = solve_expert(stats, ExpertSpec("phys", "oracle_phys", "p", (0, 1, 2)), [1.0, 10.0], 2)
    prior = leave_cells_out_prior(stats, parent, (0, 1, 2), (1,))
    ref = Ridge(alpha=parent["alpha"]).fit(x[cell != 1], y[cell != 1])
    np.testing.assert_allclose(prior, ref.coef_, rtol=1e-6)
    with process_scratch() as scratch:  # in the process's buffers, as a solve task computes it
        np.testing.assert_allclose(leave_cells_out_prior(stats, parent, (0, 1, 2), (1,), scratch), ref.coef_,
                                   rtol=1e-6)
    # a factorisation that fails in place is redone on the rebuilt matrix by the general solver
    monkeypatch.setattr(snrmoe_dask.experts, "cholesky_solve_in_place", lambda *a: None)
    np.testing.assert_allclose(leave_cells_out_prior(stats, parent, (0, 1, 2), (1,)), ref.coef_, rtol=1e-6)
    joint = ExpertSpec("joint", "oracle_joint", "c1", (1,), "phys")
    hier = ExpertSpec("hier", "hierarchical", "c1", (1,), "phys", shrink=True)
    fits = solve_expert(stats, joint, [5.0], 2, parent, twin=hier, parent_cells=(0, 1, 2), search_precision="float64")
    xs, ys = x[cell == 1] - x[cell == 1].mean(0), y[cell == 1] - y[cell == 1].mean()
    a = fits["hier"]["alpha"]  # 5 x the mean eigenvalue (a relative grid of one point)
    direct = np.linalg.solve(xs.T @ xs + a * np.eye(p), xs.T @ ys + a * prior)
    np.testing.assert_allclose(fits["hier"]["coef"], direct, rtol=1e-8)


def _eigh_gcv(cs, alphas, prior=None):
    """The reference: GCV of every alpha from a float64 eigendecomposition with vectors (plain NumPy)."""
    b, yy = cs.xty, cs.yy
    if prior is not None:
        b, yy = b - cs.gram @ prior, yy - 2 * prior @ cs.xty + prior @ cs.gram @ prior
    d, v = np.linalg.eigh(cs.gram)
    d = np.clip(d, 0, None)
    z = v.T @ b
    out = []
    for a in alphas:
        rss = max(yy - np.sum(z**2 * (d + 2 * a) / (d + a) ** 2), 0.0)
        out.append(cs.n * rss / (cs.n - 1 - np.sum(d / (d + a))) ** 2)
    return np.array(out)


_REDUCTIONS = [False, pytest.param(True, marks=pytest.mark.skipif(
    not __import__("snrmoe_dask.twostage").twostage.AVAILABLE, reason="no two-stage reduction in this LAPACK"))]


@pytest.mark.parametrize("n_rows", [100, 300, 1500])  # rows spanning < P/4 (range), < P and > P pixels
@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("two_stage", _REDUCTIONS)
def test_tridiagonal_grid_scores_choose_the_exact_gcv_alpha_on_simulated_spectra(n_rows, precision, two_stage):
    """Scoring from a reduction (``?sytrd``, or the two-stage one: no eigenvectors either way), or from the
    range of a low-rank Gram matrix, equals a float64 eigendecomposition's GCV and its choice, on spectra of the
    simulator (correlated pixels, a wide spectrum), with and without a shrinkage prior."""
    from snrmoe_dask.config import FitConfig, SimulateConfig
    from snrmoe_dask.ridge import spectrum
    from snrmoe_dask.simulate import simulate_block

    cfg = SimulateConfig(n=n_rows, n_pixels=512, seed=3)
    blk = simulate_block(cfg, 0, n_rows)
    x, y = blk["flux"].astype(np.float64), blk["logg"]
    acc = CellAccumulator(1, x[:64].mean(0), precision="float64")
    acc.add(x, y, np.zeros(n_rows, np.int64))
    cs = acc.finalize().cells([0])
    grid = ridge_alphas(cs, FitConfig().alphas_relative)
    sp = spectrum(cs, precision, two_stage=two_stage)
    assert type(sp).__name__ == ("RangeSpectrum" if n_rows == 100 else "Spectrum")
    if n_rows > 100:
        assert (sp.kd > 1) == two_stage and (sp.band is not None) == two_stage
    top = min(n_rows - 1, x.shape[1])  # the eigenvalues the rows span (the rest are zero)
    tol = 1e-11 if precision == "float64" else 1e-5
    full_rank = n_rows - 1 >= x.shape[1]  # then the degrees of freedom come from a tridiagonal trace
    assert type(sp).__name__ == "RangeSpectrum" or (sp.eigenvalues is None) == full_rank
    lam = sp.eigenvalues if sp.eigenvalues is not None else (
        scipy.linalg.eigvalsh_tridiagonal(sp.diag, sp.offdiag) + sp.shift)
    exact = np.linalg.eigvalsh(cs.gram)
    np.testing.assert_allclose(np.sort(lam)[-top:], exact[-top:], atol=tol * np.linalg.norm(cs.gram, 2))
    if full_rank:
        np.testing.assert_allclose(sp.dof(grid), [np.sum(exact / (exact + a)) for a in grid],
                                   rtol=1e-3 if precision == "float32" else 1e-8)
        np.testing.assert_allclose(sp.dof(grid), sp._dof_recurrence(grid), rtol=1e-12)  # LAPACK's pivots
    eligible = np.ones(grid.size, bool)
    if cs.n <= x.shape[1]:  # singular Gram matrix: only alphas within the df cap are candidates
        d = np.clip(np.linalg.eigvalsh(cs.gram), 0, None)
        eligible = np.array([np.sum(d / (d + a)) for a in grid]) <= FitConfig().max_df_fraction * cs.n
    for prior in (None, np.full(x.shape[1], 1e-3)):
        sol = solve_ridge(cs, grid, prior=prior, spec=sp)
        ref = _eigh_gcv(cs, grid, prior)
        # every candidate alpha scores as in float64 (near interpolation, outside the cap, rounding rules both)
        np.testing.assert_allclose(sol.gcv_path[eligible], ref[eligible], rtol=1e-3 if precision == "float32" else 1e-6)
        sol = solve_ridge(cs, grid, prior=prior, spec=sp, max_df_fraction=FitConfig().max_df_fraction)
        assert sol.alpha == grid[int(np.argmin(np.where(eligible, ref, np.inf)))]
        ref_w = Ridge(alpha=sol.alpha).fit(x, y - (0 if prior is None else x @ prior)).coef_
        np.testing.assert_allclose(sol.coef, ref_w + (0 if prior is None else prior), rtol=1e-6, atol=1e-10)


def test_an_indefinite_system_is_solved_exactly_not_by_least_squares():
    """Rounding can leave G + alpha I indefinite (float32 sums, tiny alpha): the symmetric indefinite solve
    then equals NumPy's general solve (it used to fall back to an SVD least squares, 30x slower at P = 4096)."""
    from snrmoe_dask.ridge import _exact_solve

    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.normal(size=(40, 40)))
    g = (q * np.r_[-1e-3, rng.uniform(0.1, 10, 39)]) @ q.T  # one slightly negative eigenvalue
    g = 0.5 * (g + g.T)
    b = rng.normal(size=40)
    ref = np.linalg.solve(g + 1e-4 * np.eye(40), b)
    np.testing.assert_allclose(_exact_solve(g, b, 1e-4), ref, rtol=1e-9)
    # in a reused buffer (the failed Cholesky's, refilled and factored in place), twice in a row
    from snrmoe_dask.stats import Scratch

    scratch = Scratch()
    for _ in range(2):
        np.testing.assert_allclose(_exact_solve(g, b, 1e-4, factors={}, scratch=scratch), ref, rtol=1e-9)
    np.testing.assert_array_equal(g, 0.5 * (g + g.T))  # the Gram matrix itself is never written
    singular = np.zeros((40, 40))  # least squares: the minimum-norm solution of 0 x = b is 0
    np.testing.assert_allclose(_exact_solve(singular, b, 0.0, scratch=scratch), np.zeros(40), atol=1e-12)


def _dense_band(band: np.ndarray) -> np.ndarray:
    """The symmetric matrix of a lower band storage ``band[i - j, j]``."""
    kd, p = band.shape[0] - 1, band.shape[1]
    out = np.zeros((p, p))
    for i in range(kd + 1):
        out += np.diag(band[i, :p - i], -i) + (np.diag(band[i, :p - i], i) if i else 0)
    return out


@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("two_stage", _REDUCTIONS)
def test_rotation_by_the_reflectors_gives_the_reduced_form(precision, two_stage):
    """``Spectrum.rotate`` applies ``Q^T``: ``Q^T G Q`` is the reduction's band ``B`` (``T`` itself for
    ``?sytrd``; the first stage's band for the two-stage reduction, whose tridiagonal ``T`` has ``G``'s
    eigenvalues), ``Q`` is orthogonal (norms kept, to the precision its float32 reflectors hold it), a block of
    columns rotates as its columns one by one, and a solve with the shifted band is NumPy's dense solve."""
    from snrmoe_dask.ridge import Spectrum, spectrum
    from snrmoe_dask.stats import CenteredStats

    rng = np.random.default_rng(3)
    for p in (2, 3, 60, 200):
        x = rng.normal(size=(4 * p + 40, p)) @ rng.normal(size=(p, p))
        g = x.T @ x
        sp = spectrum(CenteredStats(float(x.shape[0]), np.zeros(p), 0.0, g, np.zeros(p), 1.0), precision,
                      two_stage=two_stage)
        assert isinstance(sp, Spectrum) and (sp.band is not None) == two_stage
        t = np.diag(sp.diag) + np.diag(sp.offdiag, 1) + np.diag(sp.offdiag, -1)
        qtgq = sp.rotate(sp.rotate(g).T)  # (Q^T G Q)^T = Q^T G Q
        tol = 1e-13 if precision == "float64" else 2e-6
        b_dense = _dense_band(sp.band) if two_stage else t
        np.testing.assert_allclose(qtgq, b_dense, rtol=0, atol=tol * np.abs(g).max())
        np.testing.assert_allclose(np.linalg.eigvalsh(t), np.linalg.eigvalsh(g), rtol=0,
                                   atol=10 * tol * np.abs(g).max())
        q = rng.normal(size=p)
        a = 1e-3 * np.abs(g).max()
        np.testing.assert_allclose(sp.solve(q, a), np.linalg.solve(b_dense + (sp.shift + a) * np.eye(p), q),
                                   rtol=1e-9)
        b = rng.normal(size=(p, 3))
        np.testing.assert_allclose(np.linalg.norm(sp.rotate(b), axis=0), np.linalg.norm(b, axis=0), rtol=tol)
        np.testing.assert_allclose(sp.rotate(b)[:, 1], sp.rotate(b[:, 1]), rtol=0, atol=1e-13 * np.abs(b).max())
        np.testing.assert_allclose(sp.unrotate(sp.rotate(b)), b, rtol=0, atol=tol * np.abs(b).max())


def test_in_place_cholesky_reads_only_the_lower_triangle():
    """The leave-cells-out prior is factored in its own buffer from the lower triangle alone: equal to a dense
    solve with NaN in the upper triangle, and ``None`` (no answer) for a matrix that is not positive definite."""
    from snrmoe_dask.ridge import cholesky_solve_in_place

    rng = np.random.default_rng(5)
    x = rng.normal(size=(80, 30))
    g, b = x.T @ x, rng.normal(size=30)
    lower = np.tril(g) + np.triu(np.full(g.shape, np.nan), 1)
    np.testing.assert_allclose(cholesky_solve_in_place(lower, b, 0.5), np.linalg.solve(g + 0.5 * np.eye(30), b),
                               rtol=1e-12)
    indefinite = np.tril(-g)
    assert cholesky_solve_in_place(indefinite, b, 0.5) is None


def test_solves_in_reused_buffers_equal_solves_in_fresh_arrays():
    """solve_expert builds Gram matrices, reductions and factors in the process's Scratch: experts solved one
    after another there (a joint expert and its twin at a shared alpha, then another cell) give exactly the
    fresh-array answer, and a buffer holds the last expert's Gram matrix, not an earlier one."""
    from snrmoe_dask.experts import ExpertSpec, solve_expert
    from snrmoe_dask.ridge import spectrum
    from snrmoe_dask.stats import process_scratch

    x, y, cell, stats = _three_cells(seed=11, n=900, p=24, level=5.0, spread=1.0, slope=0.2)
    n, p = x.shape
    grid = [1e-3, 1e-2, 0.1, 1.0]
    parent = solve_expert(stats, ExpertSpec("phys", "oracle_phys", "p", (0, 1, 2)), grid, 2)
    with process_scratch() as scratch:
        scratch.clear()
    got = {}
    for c in (1, 2):
        joint = ExpertSpec(f"joint{c}", "oracle_joint", f"c{c}", (c,), "phys")
        hier = ExpertSpec(f"hier{c}", "hierarchical", f"c{c}", (c,), "phys", shrink=True)
        got.update(solve_expert(stats, joint, grid, 2, parent, twin=hier, parent_cells=(0, 1, 2),
                                search_precision="float64"))
    with process_scratch() as scratch:
        assert scratch._bufs, "the solves did not use the process's buffers"
    for c in (1, 2):
        cs = stats.cells([c])  # fresh arrays
        rest = stats.cells([k for k in (0, 1, 2) if k != c])
        prior = _exact(rest.gram, rest.xty, parent["alpha"])
        sp = spectrum(cs, "float64")
        ref = {f"joint{c}": solve_ridge(cs, ridge_alphas(cs, grid), spec=sp),
               f"hier{c}": solve_ridge(cs, ridge_alphas(cs, grid), prior=prior, spec=sp)}
        for name, r in ref.items():
            assert got[name]["alpha"] == r.alpha
            np.testing.assert_allclose(got[name]["coef"], r.coef, rtol=1e-12, atol=0)
    with process_scratch() as scratch:
        np.testing.assert_array_equal(scratch.take("gram", (p, p), np.float64), stats.cells([2]).gram)


def _exact(gram, b, alpha):
    return np.linalg.solve(gram + alpha * np.eye(gram.shape[0]), b)


def _float32_cell(n_rows: int, p: int, seed: int, flush_rows: int):
    """One cell of simulated spectra, accumulated with float32 products as the pass does: its centred statistics."""
    from snrmoe_dask.config import SimulateConfig
    from snrmoe_dask.simulate import simulate_block

    blk = simulate_block(SimulateConfig(n=n_rows, n_pixels=p, seed=seed), 0, n_rows)
    x, y = blk["flux"].astype(np.float64), blk["logg"]
    acc = CellAccumulator(1, x[:32].mean(0), precision="float32", flush_rows=flush_rows)
    acc.add(x, y, np.zeros(n_rows, np.int64))
    return acc.finalize().cells([0])


def test_a_low_rank_cell_is_solved_by_refinement_to_the_float64_solution():
    """A cell of fewer rows than a quarter of the pixels (float32-accumulated, as the pass does): its float64
    coefficients come from iterative refinement with the range's eigenpairs, and equal the direct float64
    solution; at a penalty too small for the refinement to converge the Cholesky path takes over, with the
    same answer."""
    from snrmoe_dask.ridge import REFINE_TOL, RangeSpectrum, _exact_solve, refined_solve, spectrum

    p = 512
    cs = _float32_cell(90, p, seed=5, flush_rows=32)
    sp = spectrum(cs, "float32")
    assert isinstance(sp, RangeSpectrum)
    mean_eig = np.trace(cs.gram) / p
    direct = lambda a: np.linalg.solve(cs.gram + a * np.eye(p), cs.xty)  # noqa: E731
    for rel in (1e-2, 1.0, 100.0):
        a = rel * mean_eig
        w = refined_solve(cs.gram, cs.xty, a, sp)
        assert w is not None, rel
        r = cs.xty - cs.gram @ w - a * w
        assert np.linalg.norm(r) <= REFINE_TOL * ((sp.eigenvalues[-1] + a) * np.linalg.norm(w) + np.linalg.norm(cs.xty))
        np.testing.assert_allclose(w, direct(a), rtol=1e-9, atol=1e-12 * np.abs(direct(a)).max())
        sol = solve_ridge(cs, [], fixed_alpha=a, spec=sp)
        np.testing.assert_array_equal(sol.coef, w)  # solve_ridge takes the refined solution
    tiny = 1e-6 * mean_eig
    assert refined_solve(cs.gram, cs.xty, tiny, sp) is None  # no contraction: not accepted
    sol = solve_ridge(cs, [], fixed_alpha=tiny, spec=sp)
    np.testing.assert_array_equal(sol.coef, _exact_solve(cs.gram, cs.xty, tiny))  # the factorisation's answer


@pytest.mark.skipif(not __import__("snrmoe_dask.twostage").twostage.AVAILABLE, reason="no two-stage LAPACK")
def test_an_indefinite_band_is_solved_by_the_band_lu():
    """Rounding can leave the shifted band indefinite at a tiny alpha: its Cholesky then fails and the band LU
    solves it, equal to NumPy's dense solve (as the tridiagonal path always did)."""
    from snrmoe_dask.ridge import Spectrum

    rng = np.random.default_rng(5)
    p, kd = 40, 3
    band = rng.normal(size=(kd + 1, p))
    band[0] = rng.uniform(-1.0, 1.0, p)  # an indefinite symmetric band
    band[1:, -kd:] = 0.0
    for i in range(1, kd + 1):
        band[i, p - i:] = 0.0  # storage past the last row is unused
    dense = _dense_band(band)
    assert np.linalg.eigvalsh(dense)[0] < 0
    sp = Spectrum(reflectors=np.zeros((p, p)), tau=np.zeros(p - kd), diag=np.zeros(p), offdiag=np.zeros(p - 1),
                  eigenvalues=None, shift=0.0, kd=kd, band=band)
    q = rng.normal(size=p)
    np.testing.assert_allclose(sp.solve(q, 1e-6), np.linalg.solve(dense + 1e-6 * np.eye(p), q), rtol=1e-8)


def test_the_two_stage_routines_are_found_where_scipy_links_lapack():
    """The wheels' OpenBLAS exports them (a SciPy built on a LAPACK older than 3.7 would not: ?sytrd then)."""
    from snrmoe_dask import twostage

    if not twostage.AVAILABLE:
        pytest.skip("no two-stage reduction in this LAPACK: the one-stage path is tested instead")
    rng = np.random.default_rng(6)
    x = rng.normal(size=(300, 150))
    g = x.T @ x
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 2e-6)):
        work = np.asfortranarray(g.astype(dtype))
        band, tau = twostage.band_reduce(work, 16)
        assert band.shape == (17, 150) and tau.shape == (134,)
        kept = band.copy()
        d, e = twostage.band_to_tridiagonal(band, 16)
        np.testing.assert_array_equal(band, kept)  # not modified
        t = np.diag(d.astype(float)) + np.diag(e.astype(float), 1) + np.diag(e.astype(float), -1)
        np.testing.assert_allclose(np.linalg.eigvalsh(t), np.linalg.eigvalsh(g), rtol=0, atol=tol * np.abs(g).max())
    with pytest.raises(ValueError, match="kd"):
        twostage.band_reduce(np.asfortranarray(g), 150)


@pytest.mark.parametrize("two_stage", _REDUCTIONS)
def test_a_full_rank_cell_is_solved_by_refinement_with_its_float32_reduction(two_stage):
    """A cell of more rows than pixels (float32-accumulated): the float32 reduction that scored the grid is the
    approximate inverse of a float64 refinement, whose solution has a backward error under ``REFINE_TOL`` and
    equals the direct float64 solution; where it cannot converge in its steps (the steps cut to one here) the
    Cholesky path answers instead."""
    from snrmoe_dask.ridge import REFINE_TOL, Spectrum, _exact_solve, refined_solve, spectrum

    p = 256
    cs = _float32_cell(900, p, seed=6, flush_rows=64)
    sp = spectrum(cs, "float32", two_stage=two_stage)
    assert isinstance(sp, Spectrum) and sp.eigenvalues is None  # full rank
    np.testing.assert_allclose(sp.largest, np.linalg.eigvalsh(cs.gram)[-1], rtol=1e-5)
    mean_eig = np.trace(cs.gram) / p
    for rel in (1e-3, 1e-1, 10.0):
        a = rel * mean_eig
        direct = np.linalg.solve(cs.gram + a * np.eye(p), cs.xty)
        w = refined_solve(cs.gram, cs.xty, a, sp)
        assert w is not None, rel
        r = cs.xty - cs.gram @ w - a * w
        assert np.linalg.norm(r) <= REFINE_TOL * ((sp.largest + a) * np.linalg.norm(w) + np.linalg.norm(cs.xty))
        np.testing.assert_allclose(w, direct, rtol=1e-9, atol=1e-12 * np.abs(direct).max())
        np.testing.assert_array_equal(solve_ridge(cs, [], fixed_alpha=a, spec=sp).coef, w)
    a = 1e-3 * mean_eig
    assert refined_solve(cs.gram, cs.xty, a, sp, max_steps=1) is None  # one float32-accurate step: not accepted
    np.testing.assert_allclose(_exact_solve(cs.gram, cs.xty, a), np.linalg.solve(cs.gram + a * np.eye(p), cs.xty),
                               rtol=1e-9)


class _CountingGram:
    """``gram @ w`` that counts its calls (one per residual of a refinement)."""

    def __init__(self, gram: np.ndarray):
        self.gram, self.calls = gram, 0

    def __matmul__(self, w: np.ndarray) -> np.ndarray:
        self.calls += 1
        return self.gram @ w


def test_a_refinement_that_cannot_reach_the_tolerance_stops_after_two_residuals():
    """Without contraction (a penalty far below the float32 reduction's rounding) the refinement gives up after
    its second residual, not after ``max_steps``; one that converges is not cut short, and its answer is the
    same with or without the early stop (it has the same acceptance test)."""
    from snrmoe_dask.ridge import refined_solve, spectrum

    p = 512
    cs = _float32_cell(90, p, seed=5, flush_rows=32)
    sp = spectrum(cs, "float32")
    mean_eig = np.trace(cs.gram) / p
    counting = _CountingGram(cs.gram)
    assert refined_solve(counting, cs.xty, 1e-6 * mean_eig, sp, max_steps=6) is None
    assert counting.calls == 2
    counting = _CountingGram(cs.gram)
    w = refined_solve(counting, cs.xty, mean_eig, sp, max_steps=6)
    assert w is not None and 1 <= counting.calls <= 6
    np.testing.assert_array_equal(w, refined_solve(cs.gram, cs.xty, mean_eig, sp, max_steps=counting.calls))


def test_a_refinement_of_a_zero_right_hand_side_returns_zeros():
    """``b = 0`` (a target with no covariance with the pixels) is solved by ``w = 0`` at the first residual."""
    from snrmoe_dask.ridge import refined_solve, spectrum

    cs = _float32_cell(90, 128, seed=6, flush_rows=32)
    sp = spectrum(cs, "float32")
    w = refined_solve(cs.gram, np.zeros(128), float(np.trace(cs.gram)) / 128, sp)
    assert w is not None and not w.any()
