"""The val and frozen-test rows, cached beside the model by the fit's one read.

The gates are fitted on the val rows and ``evaluate`` scores the frozen-test
rows; both need every expert's prediction, so both need the rows' flux after
the experts are solved. Those rows are spread over every chunk of the catalog:
reading them back would be a second (and third) read of the whole cube. The
pass therefore writes them as it reads each chunk, into ``MODEL/rows/``:

    rows/part-00000.zarr ...   one catalog-shaped zarr store per catalog chunk
                               with cached rows: flux, error, mask and every
                               per-spectrum variable (labels, split,
                               frozen_test), plus ``position`` (the row's index
                               in the catalog)
    rows/columns.zarr          the per-spectrum variables and ``position`` of
                               every cached row, in part order
    rows/cache.json            what was cached, from which catalog (fingerprint)

Each part is written to a temporary name and renamed, so a killed pass leaves
only whole parts, and a resumed pass skips the parts it finds.
:func:`open_row_cache` returns the union as one lazy :class:`xarray.Dataset`
that the gate stage and ``evaluate`` use exactly as they would use the
catalog.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import xarray as xr
import zarr
from dask.base import tokenize
from zarr.codecs import BloscCodec

from .checkpoint import plan_token
from .split import VAL, id_hash

__all__ = ["CachePart", "catalog_fingerprint", "cached_rows", "open_row_cache", "plan_row_cache", "remove_row_cache",
           "write_part", "CACHE_DIR"]

CACHE_DIR = "rows"
COLUMNS = "columns.zarr"
_BLOCKS = ("flux", "error", "mask")


def catalog_fingerprint(ds: xr.Dataset) -> str:
    """A short hash of a catalog's shape, wavelength grid and spectrum ids (what identifies its rows)."""
    return plan_token(shape=[int(ds.sizes["spectrum"]), int(ds.sizes["wavelength"])],
                      wavelength=np.asarray(ds["wavelength"].values, np.float64),
                      ids=np.asarray(ds["spectrum"].values).astype(np.int64))[:16]


def _cache_info(root: Path) -> dict | None:
    """``cache.json`` of a row cache, or ``None`` if ``root`` holds none (or not one this package wrote)."""
    try:
        info = json.loads((root / "cache.json").read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("kind") == "snrmoe.row_cache" else None


def remove_row_cache(root: str | Path) -> None:
    """Delete a row cache this package wrote (a directory without its ``cache.json`` is left alone)."""
    root = Path(root)
    if _cache_info(root) is not None:
        shutil.rmtree(root)


def cached_rows(ds: xr.Dataset, max_val_rows: int | None, salt: int) -> np.ndarray:
    """Boolean mask of the rows to cache: every frozen-test row and the val rows, at most ``max_val_rows``
    of them (a hash-selected subset when there are more)."""
    val = ds["split"].values == VAL
    n_val = int(val.sum())
    if max_val_rows is not None and n_val > max_val_rows:
        h = id_hash(ds["spectrum"].values, salt, stream=4)
        val &= h <= np.sort(h[val])[max_val_rows - 1]
    return val | ds["frozen_test"].values


@dataclass(frozen=True)
class CachePart:
    """The cached rows of one catalog chunk: where they go and their per-spectrum variables."""

    path: str
    rows: np.ndarray
    columns: dict
    attrs: dict
    wavelength: np.ndarray


def plan_row_cache(ds: xr.Dataset, keep: np.ndarray, root: str | Path, starts: np.ndarray,
                   meta: dict) -> list[CachePart | None]:
    """One :class:`CachePart` per chunk (``None`` where no row is kept); writes ``cache.json``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    columns = {name: np.asarray(v.values) for name, v in ds.data_vars.items() if v.dims == ("spectrum",)}
    ids = np.asarray(ds["spectrum"].values)
    wave = np.asarray(ds["wavelength"].values)
    parts: list[CachePart | None] = []
    for i in range(len(starts) - 1):
        lo, hi = int(starts[i]), int(starts[i + 1])
        local = np.flatnonzero(keep[lo:hi])
        if local.size == 0:
            parts.append(None)
            continue
        cols = {name: v[lo + local] for name, v in columns.items()}
        cols["position"] = (lo + local).astype(np.int64)
        cols["spectrum"] = ids[lo + local]
        parts.append(CachePart(str(root / f"part-{i:05d}.zarr"), local, cols, dict(ds.attrs), wave))
    # every cached row's per-spectrum variables in one small store: opening the cache reads them once, not
    # once per part (490 parts at 1M took 13 s through xarray)
    rows = np.flatnonzero(keep)
    index = xr.Dataset({name: ("spectrum", v[rows]) for name, v in columns.items()},
                       coords={"spectrum": ids[rows], "wavelength": wave}, attrs=dict(ds.attrs))
    index["position"] = ("spectrum", rows.astype(np.int64))
    shutil.rmtree(root / COLUMNS, ignore_errors=True)
    index.to_zarr(root / COLUMNS, mode="w", zarr_format=3, consolidated=False)
    info = {"kind": "snrmoe.row_cache", "version": 2, "catalog_fingerprint": catalog_fingerprint(ds),
            "rows": int(keep.sum()), "parts": sum(p is not None for p in parts),
            "part_rows": [int(p.rows.size) for p in parts if p is not None], **meta}
    (root / "cache.json").write_text(json.dumps(info, indent=2))
    return parts


def write_part(part: CachePart, flux: np.ndarray, error: np.ndarray, mask: np.ndarray | None) -> int:
    """Write one chunk's cached rows (atomically: a temporary store renamed); returns the rows written."""
    final = Path(part.path)
    if final.exists():  # a resumed pass: the part was written before the interruption
        return int(part.rows.size)
    data = {"flux": (("spectrum", "wavelength"), np.asarray(flux)[part.rows]),
            "error": (("spectrum", "wavelength"), np.asarray(error)[part.rows])}
    if mask is not None:
        data["mask"] = (("spectrum", "wavelength"), np.asarray(mask)[part.rows])
    for name, v in part.columns.items():
        if name != "spectrum":
            data[name] = ("spectrum", v)
    out = xr.Dataset(data, coords={"spectrum": part.columns["spectrum"], "wavelength": part.wavelength},
                     attrs=part.attrs)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # one chunk per variable: a part is a chunk's worth of rows, read whole (zarr would split wide arrays).
    # lz4 with byte shuffle, as the catalog: a 3.8 MB part of flux writes in 6 ms and reads in 3 ms, against
    # 12 and 5 ms with zarr's default zstd, and is smaller (0.87 against 0.90 of its raw size)
    codec = BloscCodec(cname="lz4", clevel=1, shuffle="shuffle")
    enc = {name: {"chunks": out[name].shape, "compressors": codec} for name in ("flux", "error", "mask") if name in out}
    out.to_zarr(tmp, mode="w", zarr_format=3, consolidated=False, encoding=enc)
    tmp.rename(final)
    return int(part.rows.size)


def _read_part(path: str, rows: int) -> np.ndarray:
    """One part's flux, error or mask (a task), checked against the rows ``cache.json`` recorded for it."""
    block = zarr.open_array(path, mode="r")[...]
    if block.shape[0] != rows:
        raise ValueError(f"row cache part {path} holds {block.shape[0]} rows, cache.json says {rows}: "
                         "the cache is damaged; remove MODEL/rows to read the catalog instead")
    return block


def _part_paths(root: Path) -> list[Path]:
    """The parts, in catalog chunk order (by the index in their names; text order breaks past 99,999)."""
    found = [(re.fullmatch(r"part-(\d+)\.zarr", p.name), p) for p in root.glob("part-*.zarr")]
    return [p for m, p in sorted(((m, p) for m, p in found if m), key=lambda mp: int(mp[0].group(1)))]


def open_row_cache(root: str | Path, ds: xr.Dataset | None = None) -> xr.Dataset | None:
    """The cached rows as one lazy catalog-shaped Dataset, or ``None`` if there is no complete cache.

    With ``ds``, the cache is used only if it was written from that catalog
    (same fingerprint), so a model evaluated on another catalog reads that
    catalog instead.
    """
    root = Path(root)
    info = _cache_info(root)
    if info is None:
        return None
    if ds is not None and info.get("catalog_fingerprint") != catalog_fingerprint(ds):
        return None
    paths = _part_paths(root)
    if len(paths) != info.get("parts") or not paths or info.get("version") != 2:
        return None
    try:
        out = xr.open_zarr(root / COLUMNS, consolidated=False).load()
        first = zarr.open_group(str(paths[0]), mode="r")
        names = [name for name in _BLOCKS if name in first]
        # each part's flux/error/mask is one zarr chunk (write_part): one dask block per part and variable
        rows = info.get("part_rows")
        for name in names:
            if rows is None or len(rows) != len(paths):  # an older cache: each part's shape from its metadata
                blocks = [da.from_zarr(zarr.open_array(str(p / name), mode="r")) for p in paths]
            else:  # shapes from cache.json: no metadata read per part here (1M: 978 of them, 4.4 s per stage)
                shape1, dtype = first[name].shape[1], first[name].dtype
                read = dask.delayed(_read_part, pure=True)
                blocks = [da.from_delayed(read(str(p / name), int(r),
                                               dask_key_name=f"read-row-cache-{tokenize(str(p), name)}"),
                                          (int(r), shape1), dtype=dtype) for p, r in zip(paths, rows)]
            out[name] = (("spectrum", "wavelength"), da.concatenate(blocks, axis=0))
    except (OSError, ValueError, KeyError):  # a damaged cache: the stages read the catalog instead
        return None
    if out.sizes["spectrum"] != info.get("rows"):
        return None
    out.attrs.update({"row_cache": str(root), "catalog_fingerprint": info["catalog_fingerprint"]})
    return out
