"""Synthetic PFS-like catalog, generated chunk by chunk on the Dask cluster.

Determinism: labels and noise are drawn in fixed *generation blocks* of
:data:`GEN_BLOCK` rows, each seeded by ``SeedSequence([seed, stream, block])``.
A dask chunk covering rows ``[a, b)`` regenerates the blocks it overlaps and
slices them, so the catalog is bit-identical whatever ``chunk_size`` is.
"""

from __future__ import annotations

import json
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from .catalog import SCHEMA_VERSION
from .config import SimulateConfig, StorageConfig
from .outputs import claim_output
from .physics import ForwardModel, Instrument, default_wavelength, true_snr

__all__ = ["GEN_BLOCK", "instrument_from_config", "simulate_labels", "simulate_block", "simulate_catalog",
           "write_catalog", "zarr_encoding"]

#: Rows per generation block (the unit of seeding; independent of chunking).
GEN_BLOCK = 1024
_LABEL_ORDER = ("teff", "logg", "mh", "alpha_m", "mag")


def instrument_from_config(cfg: SimulateConfig) -> Instrument:
    """The :class:`~snrmoe_dask.physics.Instrument` for a simulate config."""
    return Instrument(wave_min=cfg.wave_min, wave_max=cfg.wave_max, n_pixels=cfg.n_pixels)


def _ranges(cfg: SimulateConfig) -> dict[str, tuple[float, float]]:
    return {
        "teff": cfg.teff_range,
        "logg": cfg.logg_range,
        "mh": cfg.mh_range,
        "alpha_m": cfg.alpha_m_range,
        "mag": (cfg.mag_min, cfg.mag_max),
    }


def _gen_block(cfg: SimulateConfig, block: int, n_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels (GEN_BLOCK, 5) and unit normal noise (GEN_BLOCK, P) of one block."""
    lab_rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0, block]))
    noise_rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 1, block]))
    u = lab_rng.random((GEN_BLOCK, len(_LABEL_ORDER)))
    rng = _ranges(cfg)
    lo = np.array([rng[k][0] for k in _LABEL_ORDER])
    hi = np.array([rng[k][1] for k in _LABEL_ORDER])
    labels = lo + u * (hi - lo)
    noise = noise_rng.standard_normal((GEN_BLOCK, n_pixels), dtype=np.float32)
    return labels, noise


def _rows(cfg: SimulateConfig, start: int, stop: int, want_noise: bool) -> tuple[np.ndarray, np.ndarray | None]:
    labels, noises = [], []
    for block in range(start // GEN_BLOCK, (stop - 1) // GEN_BLOCK + 1):
        lab, noise = _gen_block(cfg, block, cfg.n_pixels)
        lo = max(start - block * GEN_BLOCK, 0)
        hi = min(stop - block * GEN_BLOCK, GEN_BLOCK)
        labels.append(lab[lo:hi])
        if want_noise:
            noises.append(noise[lo:hi])
    return np.concatenate(labels), (np.concatenate(noises) if want_noise else None)


def simulate_labels(cfg: SimulateConfig, start: int, stop: int) -> dict[str, np.ndarray]:
    """Labels of rows ``[start, stop)`` (float64), without generating spectra."""
    labels, _ = _rows(cfg, start, stop, want_noise=False)
    return {k: labels[:, i] for i, k in enumerate(_LABEL_ORDER)}


def simulate_block(cfg: SimulateConfig, start: int, stop: int) -> dict[str, np.ndarray]:
    """Rows ``[start, stop)`` of the catalog: flux, error (float32) and labels.

    Returns
    -------
    dict with ``flux``, ``error`` of shape (stop - start, n_pixels) and the
    labels ``teff, logg, mh, alpha_m, mag, snr`` of shape (stop - start,).
    """
    labels, noise = _rows(cfg, start, stop, want_noise=True)
    model = ForwardModel(instrument_from_config(cfg), cfg.noise_level)
    flux_true, error = model(*labels.T)
    out = {k: labels[:, i] for i, k in enumerate(_LABEL_ORDER)}
    out["snr"] = true_snr(flux_true, error)
    flux = flux_true + error * noise
    out["flux"] = flux.astype(np.float32)
    # noisy: the pipeline's estimate of sigma from the observed (not the true) counts
    out["error"] = (error if cfg.error_model == "noiseless" else model.sigma(flux)).astype(np.float32)
    return out


def simulate_catalog(cfg: SimulateConfig, *, id_offset: int = 0) -> xr.Dataset:
    """A lazy catalog Dataset; each chunk is one task that runs the forward model.

    Parameters
    ----------
    cfg : SimulateConfig
        Size, seed, noise level, magnitudes, grid and chunking.
    id_offset : int
        First spectrum id (ids are ``id_offset + row``).
    """
    n, p = cfg.n, cfg.n_pixels
    starts = list(range(0, n, cfg.chunk_size))
    pieces: dict[str, list] = {k: [] for k in ("flux", "error", *_LABEL_ORDER, "snr")}
    gen = dask.delayed(simulate_block, pure=True)
    token = tokenize(cfg.model_dump(mode="json"))  # every setting, not just the seed, names the tasks
    for start in starts:
        stop = min(start + cfg.chunk_size, n)
        block = gen(cfg, start, stop, dask_key_name=f"simulate-{token}-{start}-{stop}")
        rows = stop - start
        for k in pieces:
            shape = (rows, p) if k in ("flux", "error") else (rows,)
            dtype = np.float32 if k in ("flux", "error") else np.float64
            pieces[k].append(da.from_delayed(block[k], shape=shape, dtype=dtype))
    wavelength = default_wavelength(instrument_from_config(cfg))
    data = {}
    for k, parts in pieces.items():
        arr = da.concatenate(parts, axis=0)
        data[k] = (("spectrum", "wavelength") if arr.ndim == 2 else ("spectrum",), arr)
    ds = xr.Dataset(
        data,
        coords={
            "spectrum": ("spectrum", np.arange(id_offset, id_offset + n, dtype=np.int64)),
            "wavelength": ("wavelength", wavelength),
        },
    )
    ds["flux"].attrs.update(units="counts (e-) per pixel, 4 x 900 s", long_name="observed flux")
    ds["error"].attrs.update(units="counts (e-) per pixel", long_name="1-sigma noise", error_model=cfg.error_model)
    ds["wavelength"].attrs.update(units="Angstrom")
    ds["teff"].attrs.update(units="K")
    ds["logg"].attrs.update(units="dex (cgs)")
    ds["mh"].attrs.update(units="dex")
    ds["alpha_m"].attrs.update(units="dex")
    ds["mag"].attrs.update(units="AB mag, reference band 5400-6600 A")
    ds["snr"].attrs.update(long_name="true S/N: median over pixels of noiseless flux / error")
    ds.attrs.update(
        schema_version=SCHEMA_VERSION,
        source="snrmoe simulate",
        simulate_config=json.dumps(cfg.model_dump(mode="json"), sort_keys=True),
        simulated="true",
    )
    return ds


def zarr_encoding(ds: xr.Dataset, storage: StorageConfig, chunk_rows: int) -> dict[str, dict]:
    """Encoding that keeps whole spectra per chunk and compresses the cube."""
    from zarr.codecs import BloscCodec

    enc: dict[str, dict] = {}
    for name, var in ds.data_vars.items():
        chunks = (chunk_rows, ds.sizes["wavelength"]) if var.ndim == 2 else (chunk_rows,)
        chunks = tuple(min(c, s) for c, s in zip(chunks, var.shape))
        enc[name] = {"chunks": chunks}
        if var.ndim == 2 and storage.compressor != "none":
            enc[name]["compressors"] = (
                BloscCodec(cname=storage.compressor, clevel=storage.clevel, shuffle="shuffle"),
            )
    return enc


def write_catalog(ds: xr.Dataset, path: str | Path, storage: StorageConfig | None = None, *,
                  overwrite: bool = False):
    """Lazily write ``ds`` to a zarr v3 store; returns a dask Delayed to compute.

    Raises
    ------
    OutputError
        If ``path`` exists and is not a simulated catalog, or ``overwrite`` is
        false (a catalog that was not simulated, a model or any other folder is
        never replaced: :func:`~snrmoe_dask.outputs.claim_output`).
    """
    storage = storage or StorageConfig()
    path = Path(path)
    claim_output(path, "simulated catalog", overwrite=overwrite)
    chunk_rows = int(ds["flux"].chunks[0][0]) if ds["flux"].chunks else storage.ingest_chunk_size
    return ds.to_zarr(
        path,
        mode="w",
        zarr_format=3,
        consolidated=False,
        encoding=zarr_encoding(ds, storage, chunk_rows),
        compute=False,
    )
