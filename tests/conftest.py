"""Layered, seeded fixtures: small catalogs built on the fly (never committed)."""

from __future__ import annotations

from pathlib import Path

import dask
import numpy as np
import pytest
import xarray as xr

from snrmoe_dask.config import SimulateConfig, StorageConfig
from snrmoe_dask.simulate import simulate_catalog, write_catalog


def small_sim_config(**kw) -> SimulateConfig:
    """A few hundred spectra on a 512-pixel grid around the Ca triplet."""
    base = dict(n=600, seed=3, chunk_size=128, n_pixels=512, wave_min=8150.0, wave_max=8850.0)
    base.update(kw)
    return SimulateConfig(**base)


def write_sim(path: Path, cfg: SimulateConfig) -> Path:
    with dask.config.set(scheduler="threads"):
        write_catalog(simulate_catalog(cfg), path, StorageConfig()).compute()
    return path


def write_raw(path: Path, flux, error, *, wavelength=None, ids=None, mask=None, chunk=64, **labels) -> Path:
    """Write arbitrary arrays as a catalog store (to build schema violations)."""
    n, p = np.shape(flux)
    data = {"flux": (("spectrum", "wavelength"), np.asarray(flux)),
            "error": (("spectrum", "wavelength"), np.asarray(error))}
    if mask is not None:
        data["mask"] = (("spectrum", "wavelength"), np.asarray(mask))
    for k, v in labels.items():
        data[k] = ("spectrum", np.asarray(v))
    ds = xr.Dataset(data, coords={
        "spectrum": np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids),
        "wavelength": np.linspace(8000, 8800, p) if wavelength is None else np.asarray(wavelength),
    })
    ds.chunk({"spectrum": chunk}).to_zarr(path, mode="w", zarr_format=3, consolidated=False)
    return path


def clean_arrays(n=200, p=64, seed=0):
    rng = np.random.default_rng(seed)
    flux = rng.normal(100, 10, (n, p)).astype(np.float32)
    error = np.full((n, p), 10.0, np.float32)
    labels = {"logg": rng.uniform(0, 5, n), "teff": rng.uniform(3500, 6500, n), "mh": rng.uniform(-2.5, 0.75, n)}
    return flux, error, labels


@pytest.fixture(scope="session")
def sim_catalog(tmp_path_factory) -> Path:
    """600 simulated spectra x 512 pixels, chunks of 128."""
    return write_sim(tmp_path_factory.mktemp("cat") / "sim.zarr", small_sim_config())


@pytest.fixture
def raw_arrays():
    return clean_arrays()


@pytest.fixture(scope="session")
def fit_catalog(tmp_path_factory):
    """3000 spectra x 96 pixels: cells of ~65 train rows, fast to fit."""
    return write_sim(tmp_path_factory.mktemp("fit") / "cat.zarr", small_sim_config(n=3000, n_pixels=96,
                                                                                  chunk_size=256))


def fit_cfg(**fit):
    from snrmoe_dask.config import load_config

    return load_config(overrides={"catalog": {"test_size": 250}, "fit": {"min_cell_rows": 10, **fit},
                                  "cluster": {"scheduler": "threads"}})


@pytest.fixture(scope="session")
def fitted(fit_catalog, tmp_path_factory):
    """(model, cfg, model_dir) fitted on ``fit_catalog`` in float64."""
    import dask

    from snrmoe_dask.fit import fit_model

    cfg = fit_cfg(precision="float64")
    model_dir = tmp_path_factory.mktemp("m") / "model"
    with dask.config.set(scheduler="threads"):
        model = fit_model(fit_catalog, model_dir, cfg, progress=False)
    return model, cfg, model_dir


def train_cells(ds):
    """Oracle cell of every train row of a catalog (``-1`` elsewhere), 4 S/N bins."""
    from snrmoe_dask.bins import cell_index, phys_bin, snr_bin
    from snrmoe_dask.catalog import bin_edges
    from snrmoe_dask.split import TRAIN

    e = bin_edges(ds)
    cells = cell_index(phys_bin(ds["teff"].values, ds["mh"].values, e["teff_edges"], e["mh_edges"]),
                       snr_bin(ds["snr"].values, e["snr_edges"]), 4)
    return np.where(ds["split"].values == TRAIN, cells, -1)
