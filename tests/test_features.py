from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from scipy import stats as sps

from snrmoe_dask.features import (
    FEATURE_NAMES,
    LINE_NAMES,
    block_features,
    feature_table,
    quality_features,
    snr_estimate,
)


def _data(seed=0, n=40, p=300):
    rng = np.random.default_rng(seed)
    err = rng.gamma(3.0, 2.0, (n, p)).astype(np.float32)
    flux = rng.normal(50, 10, (n, p)).astype(np.float32)
    good = rng.random((n, p)) > 0.1
    good[0] = True
    good[1, :-3] = False  # only 3 good pixels
    return flux, err, good


@pytest.mark.parametrize("all_good", [False, True])
def test_quality_features_match_numpy_and_scipy(all_good):
    flux, err, good = _data()
    if all_good:
        good[:] = True
    q = quality_features(err, good)
    for i in range(err.shape[0]):
        e = err[i, good[i]].astype(np.float64)
        ref = [e.mean(), e.std(), e.min(), e.max(), np.median(e), e.sum(), np.quantile(e, 0.25),
               np.quantile(e, 0.75), sps.skew(e), sps.kurtosis(e)]
        np.testing.assert_allclose(q[i], ref, rtol=1e-9, atol=1e-12, err_msg=f"row {i}")


def _median_ref(flux, err, good, dtype):
    """NumPy's median of the good pixels' flux / error, the ratios divided in ``dtype``."""
    return np.array([np.median((flux[i, good[i]].astype(dtype) / err[i, good[i]].astype(dtype)).astype(np.float64))
                     if good[i].any() else np.nan for i in range(flux.shape[0])])


def test_snr_estimate_all_good_fast_path():
    flux, err, good = _data(5)
    good[:] = True
    s = snr_estimate(flux, err, good)
    np.testing.assert_array_equal(s, _median_ref(flux, err, good, np.float32))
    # float32 ratios keep their order: the float64 median to within the rounding of its order statistics
    np.testing.assert_allclose(s, np.median(flux / err.astype(np.float64), axis=1), rtol=2.0**-24, atol=0)
    np.testing.assert_array_equal(snr_estimate(flux.astype(np.float64), err.astype(np.float64), good),
                                  np.median(flux / err.astype(np.float64), axis=1))


@pytest.mark.parametrize("p", [300, 301])
def test_snr_estimate_mixes_selection_and_sort_paths_exactly(p):
    """Clean rows take a partition, rows with bad pixels a sort: both equal NumPy's median (even and odd P)."""
    flux, err, good = _data(7, n=30, p=p)
    good[::2] = True  # every other row clean
    s = snr_estimate(flux, err, good)
    np.testing.assert_array_equal(s, _median_ref(flux, err, good, np.float32))  # same order statistics, arithmetic
    np.testing.assert_allclose(s, _median_ref(flux, err, good, np.float64), rtol=2.0**-24)


def test_snr_estimate_of_ratios_beyond_float32():
    """A row whose float32 ratios overflow is computed in float64, not returned as inf."""
    flux, err, good = _data(8, n=6)
    good[:] = True
    flux[2] *= 1e30
    err[2] = 1e-20
    err[4, ::2] = 1e-40  # subnormal in float32: half the ratios overflow, the median with them
    s = snr_estimate(flux, err, good)
    assert np.isfinite(s).all()
    np.testing.assert_allclose(s, _median_ref(flux, err, good, np.float64), rtol=2.0**-24)


def test_snr_estimate_and_empty_rows():
    flux, err, good = _data(1)
    good[5] = False
    s = snr_estimate(flux, err, good)
    for i in range(flux.shape[0]):
        if i == 5:
            assert np.isnan(s[i])
        else:
            np.testing.assert_allclose(s[i], np.median(flux[i, good[i]] / err[i, good[i]].astype(np.float64)))
    assert np.all(np.isnan(quality_features(err, good)[5]))


def test_block_features_uses_the_pixel_mask():
    flux, err, _ = _data(2)
    flux[3, :10] = np.nan
    err[4, :10] = -1.0
    mask = np.zeros(flux.shape, bool)
    mask[6, :20] = True
    f = block_features(flux, err, mask)
    n_good = f[:, FEATURE_NAMES.index("n_good")]
    np.testing.assert_array_equal(n_good[[3, 4, 6, 7]], [290, 290, 280, 300])
    line_cols = [FEATURE_NAMES.index(c) for c in LINE_NAMES]
    assert np.isfinite(np.delete(f, line_cols, axis=1)).all()
    assert np.isnan(f[:, line_cols]).all()  # no wavelength given: line indices are NaN, not made up


def test_feature_table_is_lazy_and_chunk_invariant():
    flux, err, _ = _data(3, n=100)

    def boom(*_):
        raise AssertionError("computed during graph construction")

    trap = da.map_blocks(boom, da.zeros((100, 300), chunks=(25, 300)), dtype=np.float32)
    lazy = xr.Dataset({"flux": (("spectrum", "wavelength"), trap), "error": (("spectrum", "wavelength"), trap)},
                      coords={"spectrum": np.arange(100)})
    feature_table(lazy)  # building the graph must not compute anything

    def ds(chunk):
        return xr.Dataset({"flux": (("spectrum", "wavelength"), da.from_array(flux, chunks=(chunk, 300))),
                           "error": (("spectrum", "wavelength"), da.from_array(err, chunks=(chunk, 300)))},
                          coords={"spectrum": np.arange(100)})

    with dask.config.set(scheduler="synchronous"):
        a = feature_table(ds(100)).compute()
        b = feature_table(ds(7)).compute()
    for name in FEATURE_NAMES:
        np.testing.assert_array_equal(a[name].values, b[name].values)
    assert a["usable"].all()


@pytest.mark.parametrize("frac, expected", [(0.5, True), (1.0, False)])
def test_usable_threshold(frac, expected):
    flux, err, _ = _data(4, n=10)
    err[:, 0] = 0.0
    ds = xr.Dataset({"flux": (("spectrum", "wavelength"), flux), "error": (("spectrum", "wavelength"), err)},
                    coords={"spectrum": np.arange(10)}).chunk({"spectrum": 5})
    assert bool(feature_table(ds, frac)["usable"].all().compute()) is expected


def test_feature_table_carries_the_pixel_counts_of_catalog_info():
    from snrmoe_dask.catalog import pixel_counts

    flux, err, _ = _data(6, n=30)
    flux[2, :5] = np.nan
    err[3, :7] = 0.0
    mask = np.zeros(flux.shape, bool)
    mask[4, :9] = True
    f = block_features(flux, err, mask, rows_per_step=7)
    cols = [FEATURE_NAMES.index(c) for c in ("n_bad_flux", "n_bad_error", "n_masked", "n_good")]
    np.testing.assert_array_equal(f[:, cols], pixel_counts(flux, err, mask))
