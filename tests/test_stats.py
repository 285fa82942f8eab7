from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from snrmoe_dask.stats import (
    CellAccumulator,
    FlushBuffers,
    SufficientStats,
    impute_bad_pixels,
    memory_bytes,
    pack_lower,
    packed_quadratic,
    symmetrize_lower,
    tri_size,
    unpack_symmetric,
)


def _direct(x, y, cell, k, shift):
    """Reference: plain NumPy float64 sums for cell k."""
    sel = cell == k
    xs = x[sel].astype(np.float64) - shift
    ys = y[sel]
    return sel.sum(), xs.sum(0), ys.sum(), ys @ ys, xs.T @ xs, xs.T @ ys


def _data(seed=0, n=1500, p=24, k=5):
    rng = np.random.default_rng(seed)
    x = rng.normal(100.0, 10.0, (n, p)).astype(np.float32)
    y = rng.normal(2.5, 1.0, n)
    cell = rng.integers(-1, k, n)  # -1 = not trained on
    return x, y, cell


@pytest.mark.parametrize("flush_rows", [1, 7, 64, 5000])
def test_accumulator_matches_direct_sums_float64(flush_rows):
    x, y, cell = _data()
    shift = x[:50].mean(0).astype(np.float64)
    acc = CellAccumulator(5, shift, flush_rows=flush_rows, precision="float64")
    for lo in range(0, x.shape[0], 333):  # several blocks
        acc.add(x[lo:lo + 333], y[lo:lo + 333], cell[lo:lo + 333])
    s = acc.finalize()
    for k in range(5):
        n, sx, sy, syy, xtx, xty = _direct(x, y, cell, k, shift)
        assert s.n[k] == n
        np.testing.assert_allclose(s.sx[k], sx, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose([s.sy[k], s.syy[k]], [sy, syy], rtol=1e-12)
        np.testing.assert_allclose(unpack_symmetric(s.xtx[k]), xtx, rtol=1e-12, atol=1e-8)
        np.testing.assert_allclose(s.xty[k], xty, rtol=1e-12, atol=1e-9)
    assert acc.rows_seen == (cell >= 0).sum()


def test_float32_products_with_shift_keep_precision_at_1m_rows():
    """1M rows, flux ~ 1000 +- 3 (a hard cancellation case): centred Gram vs exact float64."""
    rng = np.random.default_rng(7)
    n, p = 1_000_000, 16
    x = (1000.0 + 3.0 * rng.standard_normal((n, p))).astype(np.float32)
    y = rng.standard_normal(n)
    cell = np.zeros(n, np.int64)
    shift = x[:2048].mean(0, dtype=np.float64)  # what reduce uses: the first chunk's mean
    acc = CellAccumulator(1, shift, flush_rows=1024, precision="float32")
    for lo in range(0, n, 65536):
        acc.add(x[lo:lo + 65536], y[lo:lo + 65536], cell[lo:lo + 65536])
    got = acc.finalize().cells([0])
    x64 = x.astype(np.float64)
    xbar = x64.mean(0)
    xc = x64 - xbar
    gram = xc.T @ xc
    np.testing.assert_allclose(got.xbar, xbar, rtol=1e-12)
    rel = np.abs(got.gram - gram).max() / np.abs(gram).max()
    assert rel < 1e-5, rel
    np.testing.assert_allclose(got.xty, xc.T @ (y - y.mean()), rtol=1e-4, atol=1e-6 * np.abs(gram).max() ** 0.5)
    # without the shift, uncentred float32 products lose the covariance entirely
    naive = x[:100_000].T.astype(np.float32) @ x[:100_000].astype(np.float32)
    m = x[:100_000].mean(0, dtype=np.float64)
    naive_gram = naive.astype(np.float64) - 100_000 * np.outer(m, m)
    ref = (x64[:100_000] - m).T @ (x64[:100_000] - m)
    assert np.abs(naive_gram - ref).max() / np.abs(ref).max() > 1e-3


def _stats(x, y, cell, shift, k=5):
    acc = CellAccumulator(k, shift, flush_rows=50, precision="float64")
    acc.add(x, y, cell)
    return acc.finalize()


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 1499), st.integers(0, 3))
def test_statistics_are_additive(cut, seed):
    x, y, cell = _data(seed, n=1500, p=8)
    whole = _stats(x, y, cell, x[:10].mean(0).astype(np.float64))
    a = _stats(x[:cut], y[:cut], cell[:cut], np.zeros(8))  # different shifts on purpose
    b = _stats(x[cut:], y[cut:], cell[cut:], np.full(8, 90.0))
    total = a + b
    for name in ("n", "sy", "syy"):
        np.testing.assert_allclose(getattr(total, name), getattr(whole, name), rtol=1e-12)
    for k in range(5):
        if whole.n[k] == 0:
            continue
        cw, ct = whole.cells([k]), total.cells([k])
        np.testing.assert_allclose(ct.gram, cw.gram, rtol=1e-8, atol=1e-6)
        np.testing.assert_allclose(ct.xty, cw.xty, rtol=1e-8, atol=1e-6)
        np.testing.assert_allclose(ct.xbar, cw.xbar, rtol=1e-12)
    inplace = a.reshift(np.zeros(8)).iadd(b)
    np.testing.assert_allclose(inplace.cells([0]).gram, whole.cells([0]).gram, rtol=1e-8, atol=1e-6)


def test_zarr_round_trip_and_bad_store(tmp_path):
    x, y, cell = _data(1, p=6)
    s = _stats(x, y, cell, np.ones(6))
    s.meta["bin_edges"] = {"snr_edges": [2, 4, 7]}
    s.to_zarr(tmp_path / "s.zarr")
    t = SufficientStats.from_zarr(tmp_path / "s.zarr")
    for name in ("n", "sx", "sy", "syy", "xtx", "xty", "shift"):
        np.testing.assert_array_equal(getattr(t, name), getattr(s, name))
    assert t.meta == s.meta
    # the packed Gram matrices are stored compressed (lossless: the round trip above is bit-exact)
    import zarr

    codecs = [type(c).__name__ for c in zarr.open_array(tmp_path / "s.zarr" / "xtx").compressors]
    assert codecs == ["BloscCodec"]
    with pytest.raises(ValueError, match="cannot add"):
        s + _stats(x[:, :3], y, cell, np.ones(3))
    with pytest.raises(ValueError, match="hold no rows"):
        SufficientStats.zeros(2, np.zeros(3)).cells([0])


def test_impute_bad_pixels_uses_row_median():
    flux = np.array([[1.0, 2.0, 30.0, np.nan], [5.0, 5.0, 5.0, 5.0]], np.float32)
    good = np.isfinite(flux)
    good[1, 0] = False
    out = impute_bad_pixels(flux, good)
    np.testing.assert_array_equal(out, [[1, 2, 30, 2], [5, 5, 5, 5]])
    assert out.dtype == np.float32
    assert np.all(impute_bad_pixels(flux, np.zeros_like(good)) == 0)


def test_memory_formula():
    packed = 36 * (4096 * 4097 // 2) * 8
    # two scratch matrices: one computes a flush while the other's sum is added into its total
    assert memory_bytes(36, 4096, 1024) == packed + 2 * 4096**2 * 4 + 36 * 1024 * 4096 * 4
    assert memory_bytes(36, 4096, 1024, "float64") == packed + 2 * 4096**2 * 8 + 36 * 1024 * 4096 * 8
    with pytest.raises(ValueError, match="precision"):
        CellAccumulator(1, np.zeros(2), precision="float16")


def test_packed_triangle_round_trip_equals_numpy_tril():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(37, 37))
    sym = np.tril(m) + np.tril(m, -1).T
    packed = pack_lower(m)
    assert packed.shape == (tri_size(37),) == (37 * 38 // 2,)
    np.testing.assert_array_equal(packed, m[np.tril_indices(37)])  # row by row, as NumPy orders tril
    np.testing.assert_array_equal(unpack_symmetric(packed), sym)
    with pytest.raises(ValueError, match="packed triangle"):
        unpack_symmetric(np.zeros(10 + 1))


@pytest.mark.parametrize("p", [1, 63, 64, 65, 150])
def test_packing_float32_products_adds_exactly_what_numpy_adds(p):
    # a flush's float32 triangle is staged band by band: the float64 sums must be NumPy's, bit for bit,
    # for sizes below, at and across the band width, into a total that already holds sums
    rng = np.random.default_rng(p)
    m = rng.normal(size=(p, p)).astype(np.float32)
    m[np.triu_indices(p, 1)] = np.nan  # the upper triangle is never read
    total = rng.normal(size=tri_size(p))
    expected = total + m[np.tril_indices(p)].astype(np.float64)
    out = pack_lower(m, total)
    assert out is total
    np.testing.assert_array_equal(out, expected)


def test_packed_quadratic_form_equals_numpy_on_the_full_matrix():
    rng = np.random.default_rng(1)
    for p in (1, 2, 37):
        m = rng.normal(size=(p, p))
        sym = np.tril(m) + np.tril(m, -1).T
        w = rng.normal(size=p)
        assert packed_quadratic(pack_lower(m), w) == pytest.approx(float(w @ sym @ w), rel=1e-12, abs=1e-12)
    with pytest.raises(ValueError, match="shape"):
        packed_quadratic(pack_lower(m), np.ones(p + 1))


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_chains_merge_and_stats_stay_packed(precision):
    x, y, cell = _data(5, n=2000, p=20)
    shift = x[:30].mean(0).astype(np.float64)
    ref = _stats(x, y, cell, shift)

    def acc_of(sl):
        a = CellAccumulator(5, shift, flush_rows=16, precision=precision)
        a.add(x[sl], y[sl], cell[sl])
        return a

    a, b = acc_of(slice(0, 1100)), acc_of(slice(1100, None))
    total = a.finalize()
    b.finalize(into=total)
    assert total.xtx.shape == (5, tri_size(20))
    tol = 1e-6 if precision == "float32" else 1e-11
    for k in range(5):
        np.testing.assert_allclose(total.cells([k]).gram, ref.cells([k]).gram, rtol=tol,
                                   atol=tol * np.abs(ref.cells([k]).gram).max())
    np.testing.assert_array_equal(total.n, ref.n)


def test_symmetrize_lower_tiles():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(37, 37))
    ref = np.tril(m) + np.tril(m, -1).T
    np.testing.assert_array_equal(symmetrize_lower(m.copy(), tile=8), ref)


def _spectra(rng, level, n, p=256):
    """Spectrum-like rows: a continuum with a line, a 10 % scale spread, Poisson + sky noise (float32)."""
    wave = np.linspace(0, 1, p)
    shape = (1 + 0.3 * np.sin(3 * wave)) * (1 - 0.4 * np.exp(-0.5 * ((wave - 0.5) / 0.01) ** 2))
    mu = level * (1 + 0.1 * rng.normal(size=(n, 1))) * shape
    return (mu + np.sqrt(mu + 50) * rng.normal(size=mu.shape)).astype(np.float32)


def test_per_cell_shift_keeps_a_faint_cell_gram_accurate_next_to_a_bright_one():
    """float32 products: the Gram error of each cell, relative to its smallest eigenvalue (float64 reference)."""
    from snrmoe_dask.reduce import shift_from_block

    rng = np.random.default_rng(0)
    bright, faint = _spectra(rng, 3000.0, 4000), _spectra(rng, 100.0, 4000)
    x = np.vstack([bright, faint])
    order = rng.permutation(x.shape[0])  # cells interleaved, as rows arrive in a catalog
    x, cell = x[order], np.r_[np.zeros(4000, np.int64), np.ones(4000, np.int64)][order]
    y = rng.normal(size=x.shape[0])
    shifts = shift_from_block(x[:512], np.ones_like(x[:512]), None, 1, cell[:512], 2)

    def rel_error(shift):
        acc = CellAccumulator(2, shift, precision="float32")
        acc.add(x, y, cell)
        stats = acc.finalize()
        out = []
        for k in (0, 1):
            xk = x[cell == k].astype(np.float64)
            ref = (xk - xk.mean(0)).T @ (xk - xk.mean(0))
            out.append(np.linalg.norm(stats.cells([k]).gram - ref, 2) / np.linalg.eigvalsh(ref)[0])
        return out

    per_cell, shared = rel_error(shifts["cells"]), rel_error(shifts["all"])
    assert max(per_cell) < 1e-3
    assert shared[1] > 100 * per_cell[1]  # one shift for both cells: the faint cell's Gram is lost in cancellation


def test_union_of_cells_with_their_own_shifts_equals_the_direct_centred_sums():
    rng = np.random.default_rng(1)
    x = np.vstack([_spectra(rng, 2000.0, 300, 40), _spectra(rng, 150.0, 200, 40)]).astype(np.float64)
    cell = np.r_[np.zeros(300, np.int64), np.ones(200, np.int64)]
    y = rng.normal(size=500) + 0.001 * x[:, 3]
    acc = CellAccumulator(2, np.vstack([x[:10].mean(0), x[300:310].mean(0)]), precision="float64")
    acc.add(x, y, cell)
    cs = acc.finalize().cells([0, 1])
    xc, yc = x - x.mean(0), y - y.mean()
    np.testing.assert_allclose(cs.gram, xc.T @ xc, rtol=1e-10, atol=1e-6)
    np.testing.assert_allclose(cs.xty, xc.T @ yc, rtol=1e-10, atol=1e-8)
    np.testing.assert_allclose(cs.xbar, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(cs.yy, yc @ yc, rtol=1e-12)


def test_statistics_written_by_version_2_full_matrices_load_packed(tmp_path):
    """Stores from before the packed layout (full (K, P, P) Gram matrices) still load, and give the same cells."""
    import json

    import xarray as xr

    x, y, cell = _data(8, n=400, p=9)
    s = _stats(x, y, cell, x[:20].mean(0).astype(np.float64))
    full = np.stack([unpack_symmetric(v) for v in s.xtx])
    xr.Dataset({"n": ("cell", s.n), "sx": (("cell", "feature"), s.sx), "sy": ("cell", s.sy), "syy": ("cell", s.syy),
                "xtx": (("cell", "feature", "feature_t"), full), "xty": (("cell", "feature"), s.xty),
                "shift": (("cell", "feature"), s.shift)},
               attrs={"meta": json.dumps({}), "kind": "snrmoe.SufficientStats", "version": "2"}).to_zarr(
        tmp_path / "v2.zarr", zarr_format=3, consolidated=False)
    back = SufficientStats.from_zarr(tmp_path / "v2.zarr")
    np.testing.assert_array_equal(back.xtx, s.xtx)


def _accumulate(x, y, cell, depth, precision="float32", flush_rows=7):
    """Two accumulators sharing one FlushBuffers of ``depth`` (as a chain's do), fed block by block."""
    shift = x[:50].mean(0).astype(np.float64)
    a = CellAccumulator(5, shift, flush_rows=flush_rows, precision=precision)
    b = CellAccumulator(1, shift, flush_rows=flush_rows, precision=precision)
    a._scratch = FlushBuffers(depth)
    b.share_scratch(a)
    for lo in range(0, x.shape[0], 333):
        a.add(x[lo:lo + 333], y[lo:lo + 333], cell[lo:lo + 333])
        b.add(x[lo:lo + 333], y[lo:lo + 333], np.where(cell[lo:lo + 333] >= 0, 0, -1))
    return a, b


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_flushes_added_on_the_pack_thread_equal_synchronous_flushes_bit_for_bit(precision):
    x, y, cell = _data(3)
    sync = [acc.finalize() for acc in _accumulate(x, y, cell, 1, precision)]
    piped = [acc.finalize() for acc in _accumulate(x, y, cell, 2, precision)]
    for s, t in zip(sync, piped):
        for name in ("n", "sx", "sy", "syy", "xtx", "xty"):
            np.testing.assert_array_equal(getattr(t, name), getattr(s, name), err_msg=name)
    # and both are the plain NumPy sums (the 1-cell accumulator holds every train row)
    n, sx, sy, syy, xtx, xty = _direct(x, y, np.where(cell >= 0, 0, -1), 0, x[:50].mean(0).astype(np.float64))
    np.testing.assert_allclose(unpack_symmetric(piped[1].xtx[0]), xtx, rtol=1e-5 if precision == "float32" else 1e-12,
                               atol=1e-2 if precision == "float32" else 1e-8)


def test_pickling_an_accumulator_waits_for_its_pending_additions():
    import pickle
    import threading

    x, y, cell = _data(4)
    a, _ = _accumulate(x, y, cell, 2)
    a.flush_all()
    gate = threading.Event()
    threading.Timer(0.5, gate.set).start()
    a._scratch._thread.submit(gate.wait)  # the pack thread is held: the next two additions wait in its queue
    a.add(x[:14], y[:14], np.zeros(14, np.int64))  # two flushes of 7 rows of cell 0, one per buffer: no wait here
    copy = pickle.loads(pickle.dumps(a))  # a dask spill or transfer of a chain mid-pass
    np.testing.assert_array_equal(copy.flush_all().xtx, a.flush_all().xtx)
    assert copy.stats.n[0] == a.stats.n[0]


def test_a_failed_addition_on_the_pack_thread_is_raised_where_the_totals_are_read():
    buffers = FlushBuffers(2)
    i, m = buffers.take(4, np.float32)
    m[:] = 1.0
    buffers.pack(i, np.zeros(3))  # a total of the wrong size
    with pytest.raises(ValueError):
        buffers.settle()
    buffers.settle()  # reported once; the buffers stay usable


def test_solves_at_once_borrow_their_own_scratch_and_solves_in_turn_reuse_one():
    """``process_scratch`` lends a set per concurrent solve (two threads never write one buffer) and the same
    set to solves that follow each other; ``clear_process_scratch`` drops the sets not lent."""
    import threading

    from snrmoe_dask.stats import clear_process_scratch, process_scratch

    clear_process_scratch()
    with process_scratch() as first:
        pass
    with process_scratch() as again:
        assert again is first
    both_in = threading.Barrier(2)
    seen: list = []

    def solve():
        with process_scratch() as s:
            s.take("gram", (8, 8), np.float64)
            seen.append(s)
            both_in.wait(timeout=10)  # the other thread holds its set now too

    threads = [threading.Thread(target=solve) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 2 and seen[0] is not seen[1]
    assert clear_process_scratch() == 2  # one buffer in each of the two sets
    with process_scratch() as fresh:
        assert len(fresh) == 0


def test_a_fold_takes_its_good_pixels_from_the_feature_rows_and_sums_the_same():
    """A block whose feature rows count every pixel good is folded without a mask, a block with bad pixels with
    the recomputed one; either way the cells and the baselines equal the fold that builds the mask itself."""
    from snrmoe_dask.baselines import BaselineAccumulator
    from snrmoe_dask.catalog import good_pixel_mask
    from snrmoe_dask.chain import ChainState
    from snrmoe_dask.features import FEATURE_NAMES, block_features
    from snrmoe_dask.reduce import _fold, _good_pixels

    rng = np.random.default_rng(3)
    n, p = 300, 40
    flux = rng.normal(100.0, 10.0, (n, p)).astype(np.float32)
    error = rng.uniform(1.0, 3.0, (n, p)).astype(np.float32)
    y, cell = rng.normal(2.5, 1.0, n), rng.integers(-1, 3, n)
    cell[9] = 0
    dirty = flux.copy()
    dirty[5, 7], dirty[9, :30] = np.nan, np.inf  # one bad pixel; one train row left unusable
    for block, clean in ((flux, True), (dirty, False)):
        feats = block_features(block, error)
        good, n_good = _good_pixels(block, error, None, feats)
        assert (good is None) == clean
        np.testing.assert_array_equal(n_good, good_pixel_mask(block, error).sum(axis=1))
        # the reference fold is told one pixel fewer is good, so it builds the mask from the block itself
        told = feats.copy()
        told[0, FEATURE_NAMES.index("n_good")] -= 1
        assert _good_pixels(block, error, None, told)[0] is not None
        states = []
        for rows in (feats, told):
            state = ChainState(CellAccumulator(3, np.full(p, 100.0), flush_rows=64, precision="float64"),
                               BaselineAccumulator(("whitened", "conditional"), np.full(p, 100.0), 64, "float64"))
            states.append(_fold(state, 0, block, error, None, (y, cell, None), p // 2, 1, rows))
        a, b = (s.cells.finalize() for s in states)
        wa, wb = (s.baselines.finalize() for s in states)
        for name in ("n", "sx", "xtx", "xty"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
            np.testing.assert_array_equal(getattr(wa.whitened, name), getattr(wb.whitened, name))
        np.testing.assert_array_equal(wa.cross.sxz, wb.cross.sxz)
        assert states[0].excluded_unusable == states[1].excluded_unusable == (0 if clean else 1)
        assert a.n.sum() == (cell >= 0).sum() - (0 if clean else 1)
