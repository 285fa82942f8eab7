"""The GIL-free rank-k update against NumPy and SciPy's f2py wrapper."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from scipy.linalg import blas as f2py_blas
from threadpoolctl import threadpool_limits

from snrmoe_dask.blas import GIL_FREE, syrk_update


def _symmetric_f(p: int, dtype, rng) -> np.ndarray:
    s = rng.standard_normal((p, p))
    return np.asfortranarray((s + s.T).astype(dtype))


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 2e-5), (np.float64, 1e-12)])
def test_syrk_update_equals_numpy_on_one_triangle(dtype, rtol):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((37, 23)).astype(dtype)
    c = _symmetric_f(23, dtype, rng)
    before = c.copy(order="F")
    out = syrk_update(c, a)
    assert out is c
    expected = before.astype(np.float64) + a.T.astype(np.float64) @ a.astype(np.float64)
    upper = np.triu_indices(23)
    np.testing.assert_allclose(c[upper], expected[upper], rtol=rtol, atol=rtol * 37)
    lower = np.tril_indices(23, -1)
    np.testing.assert_array_equal(c[lower], before[lower])  # the other triangle is not touched


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_syrk_update_is_bit_identical_to_the_f2py_wrapper(dtype):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((300, 64)).astype(dtype)
    c = _symmetric_f(64, dtype, rng)
    ref = c.copy(order="F")
    wrapper = f2py_blas.ssyrk if dtype == np.float32 else f2py_blas.dsyrk
    with threadpool_limits(limits=1, user_api="blas"):
        ref = wrapper(1.0, a.T, beta=1.0, c=ref, trans=0, lower=0, overwrite_c=1)
        syrk_update(c, a)
    np.testing.assert_array_equal(c, ref)


def test_no_rows_is_a_no_op():
    c = np.asfortranarray(np.eye(4))
    syrk_update(c, np.zeros((0, 4)))
    np.testing.assert_array_equal(c, np.eye(4))


@pytest.mark.parametrize("c, a, match", [
    (np.zeros((4, 4)), np.zeros((2, 4)), "Fortran"),  # C-ordered c (non-symmetric strides)
    (np.zeros((4, 3), order="F"), np.zeros((2, 4)), "square"),
    (np.zeros((4, 4), order="F"), np.zeros((2, 5)), r"\(m, 4\)"),
    (np.zeros((4, 4), order="F"), np.zeros((4, 2)).T, "C-ordered"),
    (np.zeros((4, 4), order="F"), np.zeros((2, 4), np.float32), "dtype"),
    (np.zeros((4, 4), np.int64, order="F"), np.zeros((2, 4), np.int64), "float32 or float64"),
])
def test_bad_arguments_are_refused(c, a, match):
    with pytest.raises(ValueError, match=match):
        syrk_update(c, a)


def test_the_cython_blas_capsule_is_used():
    # SciPy's Cython BLAS API is part of every SciPy in the pinned range: no silent fall back here
    assert GIL_FREE


def _main_thread_progress(update) -> int:
    """Loop iterations the calling thread makes while another thread runs ``update()`` once."""
    started, finished = threading.Event(), threading.Event()

    def work():
        started.set()
        update()
        finished.set()

    worker = threading.Thread(target=work)
    worker.start()
    started.wait()
    count = 0
    while not finished.is_set():
        count += 1
    worker.join()
    return count


def test_the_update_releases_the_gil():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((4096, 1536)).astype(np.float32)  # ~0.1 s of single-threaded BLAS
    c = np.zeros((1536, 1536), np.float32, order="F")
    with threadpool_limits(limits=1, user_api="blas"):
        held = _main_thread_progress(
            lambda: f2py_blas.ssyrk(1.0, a.T, beta=1.0, c=c, trans=0, lower=0, overwrite_c=1))
        free = _main_thread_progress(lambda: syrk_update(c, a))
    # with the GIL held, this thread runs only in the switch interval before the call starts
    assert free > 5 * max(held, 1), (free, held)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_without_the_capsule_the_f2py_fallback_gives_the_same_result(dtype, monkeypatch):
    import snrmoe_dask.blas as blas_mod

    rng = np.random.default_rng(3)
    a = rng.standard_normal((50, 16)).astype(dtype)
    c0 = _symmetric_f(16, dtype, rng)
    with threadpool_limits(limits=1, user_api="blas"):
        fast = syrk_update(c0.copy(order="F"), a)
        monkeypatch.setitem(blas_mod._SYRK, np.dtype(dtype), None)
        slow = syrk_update(c0.copy(order="F"), a)
    np.testing.assert_array_equal(slow, fast)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_syrk_with_beta_zero_overwrites_the_triangle(dtype):
    rng = np.random.default_rng(4)
    a = rng.normal(size=(50, 12)).astype(dtype)
    c = np.asfortranarray(np.full((12, 12), np.nan, dtype))  # whatever was there is not read
    syrk_update(c, a, beta=0.0)
    np.testing.assert_allclose(np.triu(c), np.triu(a.T.astype(np.float64) @ a), rtol=1e-5)
    syrk_update(c, a[:0], beta=0.0)
    assert not c.any()


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 2e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("pieces", [2, 3, 7])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_split_update_equals_numpy(dtype, rtol, pieces, beta):
    rng = np.random.default_rng(5)
    a = rng.standard_normal((41, 29)).astype(dtype)
    c = _symmetric_f(29, dtype, rng)
    before = c.copy(order="F")
    with threadpool_limits(limits=1, user_api="blas"):
        syrk_update(c, a, beta=beta, pieces=pieces)
    expected = beta * before.astype(np.float64) + a.T.astype(np.float64) @ a.astype(np.float64)
    upper = np.triu_indices(29)
    np.testing.assert_allclose(c[upper], expected[upper], rtol=rtol, atol=rtol * 41)
    lower = np.tril_indices(29, -1)
    np.testing.assert_array_equal(c[lower], before[lower])


def test_panels_cover_the_triangle_in_about_equal_areas():
    from snrmoe_dask.blas import panel_bounds

    b = panel_bounds(4096, 2)
    assert b[0] == 0 and b[-1] == 4096 and len(b) == 3
    areas = [(hi * (hi + 1) - lo * (lo + 1)) / 2 for lo, hi in zip(b[:-1], b[1:])]
    assert max(areas) / min(areas) < 1.01
    for p, pieces in ((3, 8), (5, 5), (100, 3)):  # never more panels than columns, never an empty one
        b = panel_bounds(p, pieces)
        assert b[0] == 0 and b[-1] == p and all(lo < hi for lo, hi in zip(b[:-1], b[1:]))
        assert len(b) - 1 <= min(p, pieces)
    assert panel_bounds(10, 1) == [0, 10]


def test_split_update_is_deterministic():
    rng = np.random.default_rng(6)
    a = rng.standard_normal((300, 200)).astype(np.float32)
    outs = []
    for _ in range(3):
        c = np.zeros((200, 200), np.float32, order="F")
        with threadpool_limits(limits=1, user_api="blas"):
            outs.append(syrk_update(c, a, beta=0.0, pieces=2).copy())
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


def _blas_counts() -> set[int]:
    from threadpoolctl import threadpool_info

    return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}


def test_blas_threads_holds_on_every_thread_of_a_pool():
    """Tasks of a worker run on several long-lived threads: each one's setting must hold, not only the first's
    (threadpoolctl 3.8 ignores, silently, limits set from any thread but the first that set one)."""
    from concurrent.futures import ThreadPoolExecutor

    from snrmoe_dask.blas import blas_threads

    with threadpool_limits(limits=2, user_api="blas"):  # a count to come back to, whatever the machine has
        outside = _blas_counts()

        def inside(_):
            with blas_threads(1):
                return _blas_counts()

        with ThreadPoolExecutor(2) as pool:
            seen = [pool.submit(inside, i).result() for i in range(8)]  # one at a time, on both threads
        assert seen == [{1}] * 8
        assert _blas_counts() == outside  # the last one out restored it


def test_blas_threads_is_shared_and_restored_by_the_last_one_out():
    from snrmoe_dask.blas import blas_threads

    with threadpool_limits(limits=2, user_api="blas"):
        entered, release, counts = threading.Barrier(2), threading.Event(), {}

        def hold(name, wait):
            with blas_threads(1):
                entered.wait(timeout=30)
                if wait:
                    release.wait(timeout=30)
                counts[name] = _blas_counts()  # the first one out must not restore it under the other

        first = threading.Thread(target=hold, args=("first", False))
        second = threading.Thread(target=hold, args=("second", True))
        first.start(), second.start()
        first.join(timeout=30)
        still = _blas_counts()
        release.set()
        second.join(timeout=30)
        assert counts == {"first": {1}, "second": {1}}
        assert still == {1}
        assert _blas_counts() == {2}


def test_blas_threads_refuses_a_nested_count_while_others_share_the_outer_one():
    from snrmoe_dask.blas import blas_threads

    entered, done = threading.Event(), threading.Event()

    def other():
        with blas_threads(1):
            entered.set()
            done.wait(timeout=30)

    t = threading.Thread(target=other)
    t.start()
    try:
        assert entered.wait(timeout=30)
        with blas_threads(1):
            with pytest.raises(RuntimeError, match="BLAS thread"):
                with blas_threads(2):
                    pass
    finally:
        done.set()
        t.join(timeout=30)


def _spd_f(p: int, dtype, rng) -> np.ndarray:
    x = rng.standard_normal((p + 8, p))
    return np.asfortranarray((x.T @ x + p * np.eye(p)).astype(dtype))


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-4), (np.float64, 1e-11)])
@pytest.mark.parametrize("p, block", [(1, 4), (7, 4), (8, 4), (9, 4), (50, 16), (64, 64), (130, 64)])
def test_blocked_cholesky_equals_numpy_and_leaves_the_other_triangle_alone(p, block, dtype, rtol):
    from snrmoe_dask.blas import cholesky_upper

    rng = np.random.default_rng(p)
    g = _spd_f(p, dtype, rng)
    c = g.copy(order="F")
    c[np.tril_indices(p, -1)] = np.nan  # never read, never written
    assert cholesky_upper(c, block=block) == 0
    expected = np.linalg.cholesky(g.astype(np.float64)).T  # upper: g = U^T U
    upper = np.triu_indices(p)
    np.testing.assert_allclose(c[upper], expected[upper], rtol=rtol, atol=rtol * np.abs(expected).max())
    assert np.isnan(c[np.tril_indices(p, -1)]).all()


@pytest.mark.parametrize("bad_row", [0, 5, 37, 99])
def test_blocked_cholesky_reports_the_first_minor_that_is_not_positive_definite_as_lapack_does(bad_row):
    from scipy.linalg import lapack

    from snrmoe_dask.blas import cholesky_upper

    rng = np.random.default_rng(1)
    g = _spd_f(100, np.float64, rng)
    g[bad_row, bad_row] = -1.0  # the leading minor of order bad_row + 1 is the first that is not positive definite
    _, info = lapack.dpotrf(g.copy(order="F"), lower=0)
    assert info == bad_row + 1
    assert cholesky_upper(g.copy(order="F"), block=16) == info


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blocked_cholesky_without_the_capsules_uses_lapack_through_f2py(dtype, monkeypatch):
    import snrmoe_dask.blas as blas_mod

    rng = np.random.default_rng(2)
    g = _spd_f(40, dtype, rng)
    fast = g.copy(order="F")
    assert blas_mod.cholesky_upper(fast, block=8) == 0
    monkeypatch.setitem(blas_mod._POTRF, np.dtype(dtype), None)
    slow = g.copy(order="F")
    slow[np.tril_indices(40, -1)] = 7.0
    assert blas_mod.cholesky_upper(slow, block=8) == 0
    np.testing.assert_allclose(np.triu(slow), np.triu(fast), rtol=1e-4 if dtype == np.float32 else 1e-12)
    assert (slow[np.tril_indices(40, -1)] == 7.0).all()
    bad = g.copy(order="F")
    bad[3, 3] = -1.0
    assert blas_mod.cholesky_upper(bad) == 4
