from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from conftest import clean_arrays, write_raw

from snrmoe_dask.catalog import CatalogError, open_catalog, pixel_counts, pixel_quality, quality_totals
from snrmoe_dask.config import CatalogConfig


def test_open_is_lazy_and_attaches_split(sim_catalog):
    ds = open_catalog(sim_catalog)
    assert ds["flux"].dtype == np.float32
    assert ds["flux"].chunks is not None  # dask-backed, nothing loaded
    assert ds["split"].dtype == np.int8
    assert set(np.unique(ds["split"].values)) <= {0, 1, 2}
    assert ds["frozen_test"].values.sum() == (ds["split"].values == 2).sum()  # 600 rows < test_size


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.drop_vars("error"), "missing variable 'error'"),
        (lambda d: d.rename({"flux": "Flux"}), "missing variable 'flux'"),
        (lambda d: d.assign(flux=d.flux.astype(np.int32)), "'flux' has dtype int32"),
        (lambda d: d.assign(logg=d.logg.where(d.spectrum != 5)),
         r"label 'logg' has 1 NaN/inf values \(first at spectrum id 5\)"),
        (lambda d: d.drop_vars("teff"), "missing label 'teff'"),
        (lambda d: d.assign_coords(spectrum=np.r_[0, np.arange(d.sizes["spectrum"] - 1)]), "1 duplicate ids"),
        (lambda d: d.assign_coords(wavelength=d.wavelength.values[::-1].copy()), "strictly increasing"),
        (lambda d: d.assign(mask=(("spectrum", "wavelength"), np.zeros(d.flux.shape, np.float32))), "'mask' has dtype"),
        (lambda d: d.assign(logg=(("spectrum", "x"), d.logg.values[:, None])), "label 'logg' has dims"),
        (lambda d: d.assign(error=d.error.T), "'error' has dims"),
    ],
)
def test_schema_violations_are_named(tmp_path, mutate, message):
    flux, error, labels = clean_arrays()
    good = write_raw(tmp_path / "good.zarr", flux, error, **labels)
    ds = mutate(xr.open_zarr(good, consolidated=False).load())
    bad = tmp_path / "bad.zarr"
    ds.to_zarr(bad, mode="w", zarr_format=3, consolidated=False)
    with pytest.raises(CatalogError, match=message):
        open_catalog(bad)


def test_chunked_along_wavelength_is_rejected(tmp_path):
    flux, error, labels = clean_arrays()
    p = tmp_path / "c.zarr"
    ds = xr.Dataset({"flux": (("spectrum", "wavelength"), flux), "error": (("spectrum", "wavelength"), error),
                     **{k: ("spectrum", v) for k, v in labels.items()}},
                    coords={"spectrum": np.arange(200), "wavelength": np.linspace(8000, 8800, 64)})
    ds.chunk({"spectrum": 50, "wavelength": 16}).to_zarr(p, zarr_format=3, consolidated=False)
    with pytest.raises(CatalogError, match="chunked along 'wavelength'"):
        open_catalog(p)


def test_not_a_store(tmp_path):
    with pytest.raises(CatalogError, match="not found"):
        open_catalog(tmp_path / "missing.zarr")
    (tmp_path / "junk").mkdir()
    with pytest.raises(CatalogError, match="not a readable zarr catalog"):
        open_catalog(tmp_path / "junk")


def test_labels_optional_for_prediction(tmp_path):
    flux, error, _ = clean_arrays()
    p = write_raw(tmp_path / "nolab.zarr", flux, error)
    with pytest.raises(CatalogError, match="missing label 'logg'"):
        open_catalog(p)
    assert open_catalog(p, require_labels=()).sizes["spectrum"] == 200


def test_bad_pixels_are_masked_and_counted(tmp_path):
    flux, error, labels = clean_arrays(n=100, p=40)
    mask = np.zeros(flux.shape, bool)
    flux[0, :3] = np.nan
    flux[1, 0] = np.inf
    error[2, :5] = 0.0
    error[3, 1] = -1.0
    error[4, 2] = np.nan
    mask[5, :7] = True
    flux[6, :] = np.nan  # a whole spectrum is bad
    error[7, :25] = 0.0  # 15 good of 40 < 50 %
    flux[8, 0] = np.nan
    error[8, 0] = 0.0  # one pixel, two reasons
    p = write_raw(tmp_path / "bad.zarr", flux, error, mask=mask, chunk=16, **labels)
    ds = open_catalog(p)
    q = pixel_quality(ds, min_good_fraction=0.5).compute()
    # reference: direct NumPy count
    np.testing.assert_array_equal(q["n_bad_flux"].values, (~np.isfinite(flux)).sum(1))
    np.testing.assert_array_equal(q["n_bad_error"].values, (~(np.isfinite(error) & (error > 0))).sum(1))
    np.testing.assert_array_equal(q["n_masked"].values, mask.sum(1))
    good = np.isfinite(flux) & np.isfinite(error) & (error > 0) & ~mask
    np.testing.assert_array_equal(q["n_good"].values, good.sum(1))
    tot = quality_totals(q)
    assert tot["bad_flux_pixels"] == 3 + 1 + 40 + 1
    assert tot["bad_error_pixels"] == 5 + 1 + 1 + 25 + 1
    assert tot["masked_pixels"] == 7
    assert tot["spectra_too_few_good_pixels"] == 2  # spectra 6 and 7
    assert tot["good_pixels"] == int(good.sum())
    np.testing.assert_array_equal(np.flatnonzero(~q["usable"].values), [6, 7])


def test_pixel_counts_kernel_without_mask():
    flux = np.array([[1.0, np.nan, 3.0]])
    error = np.array([[1.0, 1.0, 0.0]])
    np.testing.assert_array_equal(pixel_counts(flux, error), [[1, 1, 0, 1]])


def test_split_is_stable_under_rechunking(sim_catalog):
    a = open_catalog(sim_catalog)
    b = open_catalog(sim_catalog, chunk_size=37)
    assert b["flux"].chunks[0][0] == 37
    np.testing.assert_array_equal(a["split"].values, b["split"].values)
    np.testing.assert_array_equal(a["frozen_test"].values, b["frozen_test"].values)


def test_frozen_test_respects_config(sim_catalog):
    ds = open_catalog(sim_catalog, config=CatalogConfig(test_size=10))
    assert ds["frozen_test"].values.sum() == 10
