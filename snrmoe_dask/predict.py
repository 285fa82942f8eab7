"""The predict stage: a model applied to every spectrum of a catalog (one read of it)."""

from __future__ import annotations

from pathlib import Path

import xarray as xr

from .catalog import open_catalog
from .cluster import check_workers_see, compute
from .config import Config
from .outputs import claimed, replace_atomically
from .store import (
    Model,
    ModelError,
    check_grid,
)
from .zarrstore import consolidate

__all__ = ["predict_catalog"]


def predict_catalog(model: Model, catalog: str | Path, out: str | Path, cfg: Config, *, gate: str | None = None,
                    client=None, progress: bool = True, overwrite: bool = False) -> xr.Dataset:
    """Apply the model to every spectrum of a catalog (labels not needed) and write a zarr.

    ``out`` must not exist, or be an earlier predictions store and
    ``overwrite`` true (:func:`~snrmoe_dask.outputs.claim_output`: a catalog,
    a model or any other folder is never replaced). The store is written
    beside ``out`` and renamed when complete, so an interrupted predict
    leaves no output that looks finished and the previous one intact.
    """
    with claimed(out, "predictions store", "snrmoe predict", overwrite=overwrite):  # one writer per output
        return _predict(model, catalog, Path(out).absolute(), cfg, gate, client, progress)


def _predict(model: Model, catalog, out: Path, cfg: Config, gate, client, progress: bool) -> xr.Dataset:
    from .mixture import predict_dataset

    if not model.gates:
        raise ModelError("this model has no fitted gates (too few val rows at fit time); refit with a val split")
    ds = open_catalog(catalog, require_labels=(), config=cfg.catalog)
    check_grid(model, ds, catalog, cfg.catalog.grid_tolerance_pixels)
    check_workers_see(client, catalog, cfg.cluster.connect_timeout)
    pred = predict_dataset(model, ds, gate)
    with replace_atomically(out) as tmp:
        job = pred.to_zarr(tmp, mode="w-", zarr_format=3, consolidated=False, compute=False)
        compute(job, client=client, label=f"predict {ds.sizes['spectrum']} spectra (gate {pred.attrs['gate']})",
                progress=progress)
        consolidate(tmp)
    return xr.open_zarr(out, consolidated=False)

