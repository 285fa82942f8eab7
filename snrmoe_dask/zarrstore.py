"""Consolidated metadata for the stores snrmoe writes, so ``xarray.open_zarr(path)`` opens them quietly and fast.

Zarr v3 calls consolidated metadata an extension (it warns on every write);
xarray looks for it first and warns when it is missing. Every store the tool
writes for a user to open (model arrays, feature table, predictions, ceiling,
audit) is consolidated once it is complete, and catalogs are committed through
it (:func:`snrmoe_dask.ingest.commit_catalog`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

__all__ = ["consolidate"]


def consolidate(path: str | Path) -> None:
    """Write the consolidated metadata of the zarr store at ``path`` (its root ``zarr.json``)."""
    import zarr

    with warnings.catch_warnings():  # zarr v3 calls consolidated metadata experimental; we rely on it on purpose
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(path))
