"""The predict stage: a model applied to every spectrum of a catalog (one read of it)."""

from __future__ import annotations

from pathlib import Path

import xarray as xr

from .catalog import open_catalog
from .cluster import compute
from .config import Config
from .store import (
    Model,
    ModelError,
    check_grid,
)

__all__ = ["predict_catalog"]


def predict_catalog(model: Model, catalog: str | Path, out: str | Path, cfg: Config, *, gate: str | None = None,
                    client=None, progress: bool = True) -> xr.Dataset:
    """Apply the model to every spectrum of a catalog (labels not needed) and write a zarr.

    The store is written as ``OUT.partial`` and renamed when complete, so an
    interrupted predict never leaves an output that looks finished.
    """
    import shutil

    from .mixture import predict_dataset

    if not model.gates:
        raise ModelError("this model has no fitted gates (too few val rows at fit time); refit with a val split")
    ds = open_catalog(catalog, require_labels=(), config=cfg.catalog)
    check_grid(model, ds, catalog)
    pred = predict_dataset(model, ds, gate)
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    job = pred.to_zarr(tmp, mode="w", zarr_format=3, consolidated=False, compute=False)
    compute(job, client=client, label=f"predict {ds.sizes['spectrum']} spectra (gate {pred.attrs['gate']})",
            progress=progress)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return xr.open_zarr(out, consolidated=False)

