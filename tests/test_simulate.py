from __future__ import annotations

import dask
import numpy as np
import pytest
from conftest import small_sim_config, write_sim

from snrmoe_dask.catalog import open_catalog
from snrmoe_dask.config import CatalogConfig, SimulateConfig
from snrmoe_dask.physics import ForwardModel, Instrument, _build_basis, forward_model, true_snr
from snrmoe_dask.pipeline import snr_distribution
from snrmoe_dask.simulate import instrument_from_config, simulate_block, simulate_catalog


def _cube(cfg):
    with dask.config.set(scheduler="threads"):
        ds = simulate_catalog(cfg).compute()
    return ds


def test_deterministic_given_seed_whatever_the_chunking():
    a = _cube(small_sim_config(n=300, chunk_size=300))
    b = _cube(small_sim_config(n=300, chunk_size=41))
    c = _cube(small_sim_config(n=300, chunk_size=1024))
    for other in (b, c):
        for k in ("flux", "error", "logg", "teff", "mh", "alpha_m", "mag", "snr"):
            np.testing.assert_array_equal(a[k].values, other[k].values, err_msg=k)


def test_prefix_property_and_seed_dependence():
    a = _cube(small_sim_config(n=300))
    b = _cube(small_sim_config(n=1100))  # crosses a generation block
    np.testing.assert_array_equal(a["flux"].values, b["flux"].values[:300])
    d = _cube(small_sim_config(n=300, seed=4))
    assert not np.array_equal(a["flux"].values, d["flux"].values)


def test_labels_inside_configured_box():
    ds = _cube(small_sim_config(n=1000))
    cfg = SimulateConfig()
    for k, (lo, hi) in {"teff": cfg.teff_range, "logg": cfg.logg_range, "mh": cfg.mh_range,
                        "alpha_m": cfg.alpha_m_range, "mag": (20.5, 22.5)}.items():
        v = ds[k].values
        assert v.min() >= lo and v.max() <= hi, k
        assert v.max() - v.min() > 0.9 * (hi - lo), k  # fills the box


def test_forward_model_reproduces_written_catalog(sim_catalog):
    ds = open_catalog(sim_catalog).isel(spectrum=slice(0, 200)).load()
    cfg = small_sim_config()
    labels = {k: ds[k].values for k in ("teff", "logg", "mh", "alpha_m", "mag")}
    flux, error = forward_model(labels, instrument=instrument_from_config(cfg))
    np.testing.assert_allclose(ds["error"].values, error, rtol=1e-6)
    np.testing.assert_allclose(ds["snr"].values, true_snr(flux, error), rtol=1e-12)
    z = (ds["flux"].values - flux) / error
    assert abs(z.mean()) < 0.01
    assert abs(z.std() - 1.0) < 0.01


def test_noise_model_is_source_plus_sky_plus_read():
    ins = Instrument()
    model = ForwardModel(ins)
    labels = dict(teff=[4000.0, 6000.0], logg=[4.5, 1.0], mh=[0.0, -1.0], alpha_m=[0.2, 0.0], mag=[21.0, 22.0])
    flux, error = forward_model(labels)
    # the error of a zero-flux source is the sky + read + systematic floor
    floor = model.sigma(np.zeros_like(flux))
    np.testing.assert_allclose(error**2 - floor**2, flux, rtol=1e-9)  # Poisson source term = the leak
    # sky is stronger to the red (OH bands): floor of the reddest quarter exceeds the bluest
    assert floor[0, -1024:].mean() > floor[0, :1024].mean()
    # noise_level scales the error linearly
    np.testing.assert_allclose(forward_model(labels, noise_level=2.0)[1], 2 * error)


def test_gravity_signal_comes_from_line_physics():
    wave = ForwardModel().wavelength
    base = dict(teff=[3800.0], mh=[0.0], alpha_m=[0.0], mag=[21.0])
    dwarf, _ = forward_model({**base, "logg": [4.8]})
    giant, _ = forward_model({**base, "logg": [0.5]})
    diff = np.abs(dwarf[0] - giant[0]) / dwarf[0].max()
    # the continuum does not depend on logg: far from lines the spectra agree
    lines = [7665, 7699, 8183, 8195, 8498, 8542, 8662, 8807]
    near = np.zeros(wave.size, bool)
    for lam in lines:
        near |= np.abs(wave - lam) < 8
    assert diff[near].max() > 0.02
    # Na I 8190 doublet: larger equivalent width in the cool dwarf (pressure wings)
    model = ForwardModel()
    cont = model.continuum([3800.0], [21.0])[0]
    na = (wave > 8170) & (wave < 8210)
    ew = {k: np.sum(1 - f[0, na] / cont[na]) * np.diff(wave).mean() for k, f in (("dwarf", dwarf), ("giant", giant))}
    assert ew["dwarf"] > 1.15 * ew["giant"], ew
    # the Ca II triplet (an ion, ~ g^-1/3) is stronger in the giant
    cat = (wave > 8480) & (wave < 8680)
    assert giant[0, cat].sum() < dwarf[0, cat].sum()


def test_forward_model_needs_all_labels():
    with pytest.raises(ValueError, match="missing"):
        forward_model({"teff": [5000.0]})


def test_snr_calibration_matches_spec():
    """The target (docs/method.md, the simulator) at noise 1, mag 20.5-22.5: median ~2.9, max ~9, H/M/L/X ~
    3/30/38/29 %."""
    cfg = SimulateConfig(n=16_384)
    out = simulate_block(cfg, 0, cfg.n)
    dist = snr_distribution(out["snr"], CatalogConfig())
    assert abs(dist["median"] - 2.9) < 0.15
    assert 8.0 < dist["max"] < 11.0
    target = {"H": 0.03, "M": 0.30, "L": 0.38, "X": 0.29}
    for name, frac in target.items():
        assert abs(dist["fractions"][name] - frac) < 0.03, (name, dist["fractions"])


def test_written_catalog_is_on_the_schema(sim_catalog):
    ds = open_catalog(sim_catalog, require_labels=("logg", "teff", "mh", "alpha_m", "mag", "snr"))
    assert ds.attrs["schema_version"] == "1.0"
    assert ds["flux"].encoding["chunks"] == (128, 512)
    assert ds["wavelength"].attrs["units"] == "Angstrom"


def test_simulate_on_distributed_cluster(tmp_path):
    from distributed import Client, LocalCluster

    cfg = small_sim_config(n=256, chunk_size=64)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cl, \
            Client(cl) as client:
        from snrmoe_dask.config import StorageConfig
        from snrmoe_dask.pipeline import run_simulate

        res = run_simulate(cfg, tmp_path / "c.zarr", StorageConfig(), client=client, progress=False)
    assert res["n"] == 256
    ref = write_sim(tmp_path / "ref.zarr", cfg)
    a, b = open_catalog(tmp_path / "c.zarr").load(), open_catalog(ref).load()
    np.testing.assert_array_equal(a["flux"].values, b["flux"].values)


def test_task_names_depend_on_every_setting():
    a = simulate_catalog(small_sim_config(n=200))
    b = simulate_catalog(small_sim_config(n=200, noise_level=2.0))
    assert a["flux"].data.name != b["flux"].data.name
    assert not set(dict(a["flux"].data.dask)) & set(k for k in dict(b["flux"].data.dask) if "simulate" in str(k))


def test_noisy_error_model_estimates_sigma_from_the_observed_counts():
    noiseless = simulate_block(small_sim_config(n=200), 0, 200)
    noisy = simulate_block(small_sim_config(n=200, error_model="noisy"), 0, 200)
    np.testing.assert_array_equal(noisy["flux"], noiseless["flux"])  # the same observation
    np.testing.assert_array_equal(noisy["snr"], noiseless["snr"])  # the true S/N label is unchanged
    cfg = small_sim_config()
    ins = instrument_from_config(cfg)
    _, _, sky, _ = _build_basis(ins)
    read_var = ins.n_exposures * ins.n_spatial * ins.read_noise**2
    expected = np.sqrt(np.clip(noiseless["flux"].astype(np.float64), 0, None) + sky + read_var
                       + (ins.sky_systematic * sky) ** 2)
    np.testing.assert_allclose(noisy["error"], expected, rtol=1e-5)  # counts, not the noiseless model
    assert not np.allclose(noisy["error"], noiseless["error"], rtol=1e-3)
    with pytest.raises(ValueError):
        SimulateConfig(error_model="guess")
